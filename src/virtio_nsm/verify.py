"""Verify Nitro attestation documents: the decision whether to trust an enclave.

Theory of operation
-------------------
A document is an ES384 COSE_Sign1 whose payload names a leaf certificate and a
CA bundle. :func:`verify_document` follows AWS's validation process and adds
the checks a careful verifier wants; it never stops at the first problem but
collects every reason and raises one :class:`VerificationError` listing them.

1. **Syntax** (:func:`parse_unverified`, also what ``nsm inspect`` shows): the
   COSE structure (untagged or tag 18, the protected header exactly ``{1: -35}``,
   an unprotected map, a 96-byte signature) and the payload, both read with a
   strict decoder (:mod:`virtio_nsm._strict_cbor`: no tags but the outer 18 --
   so no shared references, whose expansion could be exponential -- no
   duplicate keys, definite or indefinite lengths, any key order, cost linear in
   the size; a tag in the unprotected header makes the document unreadable).
   Required fields and their types and sizes: ``module_id`` non-empty text;
   ``digest`` one of SHA256/SHA384/SHA512;
   ``timestamp`` an unsigned integer > 0 (milliseconds); ``pcrs`` 1..32 entries,
   index < 32, each value as long as ``digest`` says (32/48/64 bytes);
   ``certificate`` 1..1024 bytes; ``cabundle`` 1..16 entries of 1..1024 bytes.
   ``public_key``, ``user_data`` and ``nonce`` are bytes, or ``null``/absent
   (both mean "absent"); the real device enforces no size on them, so neither
   does this. Unknown extra fields are ignored.
2. **Chain**: the path is ``[leaf, *reversed(cabundle)]``, and ``cabundle[0]``
   must be a trusted root (DER-equal) or be issued by one. cryptography's RFC
   5280 validator (web-PKI CA profile, permissive leaf profile, which the facts
   sheet says real documents need) checks names and signatures and must build
   exactly this path to the same roots; when it refuses, each link is
   re-checked on its own to say which one is broken. Then, explicitly, every
   certificate, the root included, must be valid at ``at``, be X.509 v3 in
   strict DER with a positive serial, carry a P-384 key, be signed with
   ecdsa-with-SHA384, and mark no unknown extension critical. CA certificates
   need a critical basicConstraints with CA set, keyCertSign, and a pathLen that
   admits the CAs below them; the leaf must not be a CA and needs
   digitalSignature.
3. **Signature**: the COSE Sig_structure verifies under the leaf's key.
4. **Policy**: the timestamp lies within the leaf's validity; it is not more
   than ``clock_skew`` (default 60 s) after ``at``; optionally it is at most
   ``max_age`` before ``at``; optionally the PCRs and the nonce equal what the
   caller expects.

Documents from the future
~~~~~~~~~~~~~~~~~~~~~~~~~
A timestamp later than ``at`` by more than ``clock_skew`` is rejected: either
the verifier's clock (or a pinned ``at``) is wrong, or the document would stay
"fresh" under ``max_age`` for longer than intended. Within the skew, the age is
taken as zero. The real leaf is issued seconds before the first document it
signs, so a small skew only ever matters for clocks that disagree.

What the signature does not cover
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
The tag 18, the unprotected header (accepted if it is a map, then ignored) and
the widths of the outer CBOR heads are not signed, so one attestation has many
valid encodings. Identify a document by its signed contents (for replay
protection: the nonce), never by a hash of its bytes.

Time is a parameter (``at``); nothing here reads the clock except to default it.
Nothing here raises anything but :class:`VerificationError` for bad document
bytes; bad *arguments* (an empty root list, a PCR index of 40) are programming
errors and raise :class:`ValueError` or :class:`TypeError`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import hmac
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from types import MappingProxyType
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509 import verification as x509v
from cryptography.x509.oid import ExtensionOID, SignatureAlgorithmOID

from . import _strict_cbor, cose

__all__ = [
    "AWS_NITRO_ROOT_SHA256",
    "DEFAULT_CLOCK_SKEW",
    "UnverifiedDocument",
    "VerificationError",
    "VerifiedDocument",
    "aws_nitro_root",
    "load_pem_roots",
    "parse_unverified",
    "verify_document",
]

#: SHA-256 of the DER of AWS_NitroEnclaves_Root-G1, as AWS publishes it.
AWS_NITRO_ROOT_SHA256: Final = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
#: How far a document's timestamp may lie after the verification time.
DEFAULT_CLOCK_SKEW: Final = dt.timedelta(seconds=60)

MAX_CERT_SIZE: Final = 1024
MAX_CABUNDLE_ENTRIES: Final = 16
MAX_PCRS: Final = 32
#: PCR length for each digest name the payload may carry.
DIGEST_SIZES: Final[Mapping[str, int]] = MappingProxyType({"SHA256": 32, "SHA384": 48, "SHA512": 64})
SIGNATURE_SIZE: Final = 2 * cose.P384_COORDINATE_SIZE
REQUIRED_FIELDS: Final = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
OPTIONAL_FIELDS: Final = ("public_key", "user_data", "nonce")

_EPOCH: Final = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
#: Largest millisecond timestamp a datetime can hold (end of year 9999).
_MAX_TIMESTAMP_MS: Final = 253_402_300_799_999
#: Extensions whose meaning the chain checks below implement or that carry no
#: constraint; any other extension marked critical makes a certificate unusable.
_UNDERSTOOD_CRITICAL: Final = frozenset(
    {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
)


class VerificationError(Exception):
    """The document must not be trusted; :attr:`reasons` lists every reason found."""

    def __init__(self, reasons: Sequence[str]) -> None:
        self.reasons: list[str] = list(reasons) or ["unspecified verification failure"]
        super().__init__("attestation document is invalid: " + "; ".join(self.reasons))

    def __reduce__(self) -> tuple[type[VerificationError], tuple[list[str]]]:
        return (type(self), (self.reasons,))


@dataclass(frozen=True)
class VerifiedDocument:
    """A document that passed every check; ``None`` marks an absent optional field."""

    module_id: str
    digest: str
    #: Milliseconds since the Unix epoch, as signed.
    timestamp: int
    #: :attr:`timestamp` as an aware UTC datetime.
    time: dt.datetime
    pcrs: Mapping[int, bytes]
    #: DER of the leaf certificate.
    certificate: bytes
    #: DER of the CA bundle, in document order (root first).
    cabundle: tuple[bytes, ...]
    #: The validated path: leaf first, trusted root last.
    chain: tuple[x509.Certificate, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None


@dataclass(frozen=True)
class UnverifiedDocument:
    """What a document claims, decoded but **not** verified (see :func:`parse_unverified`).

    Each field is ``None`` when it is absent or unusable; :attr:`problems` says
    why. :attr:`fields` holds the payload map as decoded, unknown keys included.
    """

    tagged: bool | None = None
    protected: bytes | None = None
    unprotected: Any = None
    payload: bytes | None = None
    signature: bytes | None = None
    fields: Mapping[Any, Any] = field(default_factory=dict)
    module_id: str | None = None
    digest: str | None = None
    timestamp: int | None = None
    pcrs: Mapping[int, bytes] | None = None
    certificate: bytes | None = None
    cabundle: tuple[bytes, ...] | None = None
    public_key: bytes | None = None
    user_data: bytes | None = None
    nonce: bytes | None = None
    #: The parsed leaf, if its DER parses.
    leaf: x509.Certificate | None = None
    #: The parsed CA bundle (document order); ``None`` entries did not parse.
    bundle: tuple[x509.Certificate | None, ...] = ()
    problems: tuple[str, ...] = ()

    @property
    def time(self) -> dt.datetime | None:
        """:attr:`timestamp` as a UTC datetime, if it is representable."""
        if self.timestamp is None or not 0 <= self.timestamp <= _MAX_TIMESTAMP_MS:
            return None
        return _EPOCH + dt.timedelta(milliseconds=self.timestamp)


# -- trusted roots ---------------------------------------------------------------


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(Encoding.DER)


def _load_aws_root() -> x509.Certificate:
    pem = resources.files("virtio_nsm").joinpath("data/aws_nitro_enclaves_root_g1.pem")
    cert = x509.load_pem_x509_certificate(pem.read_bytes())
    digest = hashlib.sha256(_der(cert)).hexdigest()
    if not hmac.compare_digest(digest, AWS_NITRO_ROOT_SHA256):
        raise ImportError(
            f"the shipped AWS Nitro root has SHA-256 {digest}, expected {AWS_NITRO_ROOT_SHA256}"
        )
    return cert


_AWS_ROOT: Final = _load_aws_root()


def aws_nitro_root() -> x509.Certificate:
    """The AWS Nitro Enclaves root (G1) shipped in this package, checked at import."""
    return _AWS_ROOT


def load_pem_roots(data: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle; raise :class:`ValueError` if there is none."""
    certs = x509.load_pem_x509_certificates(data)
    if not certs:
        raise ValueError("no certificate in the PEM data")
    return certs


# -- step 1: syntax ----------------------------------------------------------------


def _short_hex(data: bytes, limit: int = 16) -> str:
    text = data[:limit].hex()
    return text + ("…" if len(data) > limit else "")


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _type_name(value: Any) -> str:
    """The CBOR type of a decoded value, with its article."""
    if value is None:
        return "null"
    return {
        bool: "a bool",
        int: "an integer",
        float: "a float",
        bytes: "a byte string",
        str: "a text string",
        list: "an array",
        dict: "a map",
    }.get(type(value), type(value).__name__)


class _Syntax:
    """Collects the decoded values and the problems of :func:`parse_unverified`."""

    def __init__(self) -> None:
        self.values: dict[str, Any] = {}
        self.problems: list[str] = []

    def cose(self, doc: bytes) -> None:
        try:
            parts, tagged = cose.split_sign1(doc)
        except cose.CoseError as exc:
            self.problems.append(f"not a COSE_Sign1: {exc}")
            return
        self.values["tagged"] = tagged
        self.problems.extend(cose.sign1_problems(parts))
        protected, unprotected, payload, signature = parts
        if isinstance(unprotected, Mapping):
            self.values["unprotected"] = dict(unprotected)
        if isinstance(protected, bytes):
            self.values["protected"] = protected
            if protected != cose.PROTECTED_ES384:
                self.problems.append(
                    f"protected header must be exactly {{1: -35}} (ES384), got h'{_short_hex(protected)}'"
                )
        if isinstance(signature, bytes):
            self.values["signature"] = signature
            if len(signature) != SIGNATURE_SIZE:
                self.problems.append(f"signature is {len(signature)} bytes, ES384 needs {SIGNATURE_SIZE}")
        if isinstance(payload, bytes):
            self.values["payload"] = payload
            self.payload(payload)

    def payload(self, payload: bytes) -> None:
        try:
            fields = _strict_cbor.loads(payload)
        except _strict_cbor.StrictCborError as exc:
            self.problems.append(f"payload is not acceptable CBOR: {exc}")
            return
        if not isinstance(fields, dict):
            self.problems.append(f"payload is {_type_name(fields)}, not a map")
            return
        self.values["fields"] = fields
        # In this order: the pcrs check needs the digest.
        checks: dict[str, Callable[[Any], None]] = {
            "module_id": self.module_id,
            "digest": self.digest,
            "timestamp": self.timestamp,
            "pcrs": self.pcrs,
            "certificate": self.certificate,
            "cabundle": self.cabundle,
        }
        for name, check in checks.items():
            if name not in fields:
                self.problems.append(f"payload has no {name}")
            elif fields[name] is None:
                self.problems.append(f"{name} is null")
            else:
                check(fields[name])
        for name in OPTIONAL_FIELDS:
            value = fields.get(name)
            if value is not None and not isinstance(value, bytes):
                self.problems.append(f"{name} is {_type_name(value)}, not bytes or null")
            elif value is not None:
                self.values[name] = value

    def module_id(self, value: Any) -> None:
        if not isinstance(value, str):
            self.problems.append(f"module_id is {_type_name(value)}, not text")
        elif not value:
            self.problems.append("module_id is empty")
        else:
            self.values["module_id"] = value

    def digest(self, value: Any) -> None:
        if not isinstance(value, str) or value not in DIGEST_SIZES:
            shown = _strict_cbor.shown(value) if isinstance(value, str) else _type_name(value)
            self.problems.append(f"digest is {shown}, not one of {', '.join(DIGEST_SIZES)}")
        else:
            self.values["digest"] = value

    def timestamp(self, value: Any) -> None:
        if not _is_uint(value):
            self.problems.append(f"timestamp is {_type_name(value)}, not an unsigned integer")
        elif value == 0:
            self.problems.append("timestamp is 0")
        elif value >= 1 << 64:
            self.problems.append("timestamp does not fit in 64 bits")
        else:
            self.values["timestamp"] = value

    def pcrs(self, value: Any) -> None:
        if not isinstance(value, dict):
            self.problems.append(f"pcrs is {_type_name(value)}, not a map")
            return
        if not 1 <= len(value) <= MAX_PCRS:
            self.problems.append(f"pcrs has {len(value)} entries, must have 1 to {MAX_PCRS}")
        size = DIGEST_SIZES.get(self.values.get("digest", ""))
        good: dict[int, bytes] = {}
        for index, pcr in value.items():
            if not _is_uint(index) or index >= MAX_PCRS:
                self.problems.append(f"pcrs has an invalid index {_strict_cbor.shown(index)}")
                continue
            if not isinstance(pcr, bytes):
                self.problems.append(f"PCR{index} is {_type_name(pcr)}, not bytes")
            elif len(pcr) not in DIGEST_SIZES.values():
                self.problems.append(f"PCR{index} is {len(pcr)} bytes, not 32, 48 or 64")
            elif size is not None and len(pcr) != size:
                self.problems.append(
                    f"PCR{index} is {len(pcr)} bytes but digest {self.values['digest']} gives {size}"
                )
            else:
                good[index] = pcr
        self.values["pcrs"] = MappingProxyType(dict(sorted(good.items())))

    def _der_size(self, what: str, value: bytes) -> bool:
        if not 1 <= len(value) <= MAX_CERT_SIZE:
            self.problems.append(f"{what} is {len(value)} bytes, must be 1 to {MAX_CERT_SIZE}")
            return False
        return True

    def _parse_cert(self, what: str, value: bytes) -> x509.Certificate | None:
        try:
            cert = x509.load_der_x509_certificate(value)
        except Exception as exc:  # ValueError, x509.InvalidVersion, ...
            self.problems.append(f"{what} is not a DER X.509 certificate: {exc}")
            return None
        # cryptography decodes some parts lazily; read those the checks use now
        # so that a malformed part is a syntax problem here, not an exception
        # later. (Names are left to the path validator, which parses them.)
        try:
            cert.public_key()
            _ = cert.extensions, cert.signature_algorithm_oid, cert.serial_number
            _ = cert.not_valid_before_utc, cert.not_valid_after_utc, cert.version
        except Exception as exc:  # ValueError, UnsupportedAlgorithm, DuplicateExtension, ...
            self.problems.append(f"{what} has an unreadable part: {exc}")
            return None
        if cert.serial_number <= 0:  # RFC 5280 4.1.2.2; cryptography only warns
            self.problems.append(f"{what} has a serial number that is not positive")
        # The certificate ends with its signature BIT STRING; DER needs 0 unused
        # bits there, but cryptography ignores that byte, which would let one
        # certificate have several encodings.
        unused_bits_at = len(value) - len(cert.signature) - 1
        if unused_bits_at < 0 or value[unused_bits_at] != 0:
            self.problems.append(f"{what} is not DER: its signature has unused bits")
        return cert

    def certificate(self, value: Any) -> None:
        if not isinstance(value, bytes):
            self.problems.append(f"certificate is {_type_name(value)}, not bytes")
            return
        if self._der_size("certificate", value):
            self.values["certificate"] = value
            self.values["leaf"] = self._parse_cert("certificate", value)

    def cabundle(self, value: Any) -> None:
        if not isinstance(value, list):
            self.problems.append(f"cabundle is {_type_name(value)}, not an array")
            return
        if not 1 <= len(value) <= MAX_CABUNDLE_ENTRIES:
            self.problems.append(f"cabundle has {len(value)} entries, must have 1 to {MAX_CABUNDLE_ENTRIES}")
            if len(value) > MAX_CABUNDLE_ENTRIES:
                return
        ders: list[bytes] = []
        certs: list[x509.Certificate | None] = []
        for i, entry in enumerate(value):
            what = f"cabundle[{i}]"
            if not isinstance(entry, bytes):
                self.problems.append(f"{what} is {_type_name(entry)}, not bytes")
                certs.append(None)
                continue
            ders.append(entry)
            certs.append(self._parse_cert(what, entry) if self._der_size(what, entry) else None)
        if len(ders) == len(value):
            self.values["cabundle"] = tuple(ders)
        self.values["bundle"] = tuple(certs)


def parse_unverified(doc: bytes) -> UnverifiedDocument:
    """Decode a document and check its syntax only; **nothing is verified**.

    Never raises for bad bytes: what cannot be decoded is left ``None`` and
    explained in :attr:`UnverifiedDocument.problems`.
    """
    syntax = _Syntax()
    try:
        syntax.cose(bytes(doc))
    except Exception as exc:  # fail closed: a decoder bug must not escape as a crash
        syntax.problems.append(f"internal error while decoding: {_strict_cbor.shown(exc, 200)}")
    return UnverifiedDocument(**syntax.values, problems=tuple(syntax.problems))


# -- step 2: chain -----------------------------------------------------------------


def _label(index: int, length: int, anchored_by_root: bool) -> str:
    """Name of ``path[index]`` where ``path = [leaf, *reversed(cabundle), (root)]``."""
    if index == 0:
        return "leaf certificate"
    bundle_len = length - 1 - int(anchored_by_root)
    if anchored_by_root and index == length - 1:
        return "trusted root"
    return f"cabundle[{bundle_len - index}]"


def _when(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def _check_certificate(
    cert: x509.Certificate, label: str, index: int, at: dt.datetime, reasons: list[str]
) -> None:
    if at < cert.not_valid_before_utc:
        reasons.append(f"{label} is not valid before {_when(cert.not_valid_before_utc)}")
    if at > cert.not_valid_after_utc:
        reasons.append(f"{label} expired at {_when(cert.not_valid_after_utc)}")
    if cert.version is not x509.Version.v3:
        reasons.append(f"{label} is not an X.509 v3 certificate")
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
        reasons.append(f"{label} does not have an ECDSA P-384 key")
    if cert.signature_algorithm_oid != SignatureAlgorithmOID.ECDSA_WITH_SHA384:
        reasons.append(f"{label} is not signed with ecdsa-with-SHA384")
    extensions = cert.extensions  # readable: checked by _Syntax._parse_cert
    for ext in extensions:
        if ext.critical and ext.oid not in _UNDERSTOOD_CRITICAL:
            reasons.append(f"{label} has an unsupported critical extension {ext.oid.dotted_string}")
    try:
        bc: x509.Extension[x509.BasicConstraints] | None = extensions.get_extension_for_class(
            x509.BasicConstraints
        )
    except x509.ExtensionNotFound:
        bc = None
    try:
        ku: x509.KeyUsage | None = extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        ku = None
    if index == 0:
        if bc is not None and bc.value.ca:
            reasons.append(f"{label} is a CA certificate")
        if ku is None or not ku.digital_signature:
            reasons.append(f"{label} lacks the digitalSignature key usage")
        return
    if bc is None or not bc.value.ca:
        reasons.append(f"{label} is not a CA certificate (basicConstraints CA missing)")
    else:
        if not bc.critical:
            reasons.append(f"{label} has a non-critical basicConstraints")
        # path[1..index-1] are the CAs between this one and the leaf.
        if bc.value.path_length is not None and index - 1 > bc.value.path_length:
            reasons.append(f"{label} allows {bc.value.path_length} CA(s) below it, the chain has {index - 1}")
    if ku is None or not ku.key_cert_sign:
        reasons.append(f"{label} lacks the keyCertSign key usage")


def _rfc5280_path(
    leaf: x509.Certificate,
    bundle: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    at: dt.datetime,
) -> tuple[list[x509.Certificate] | None, str | None]:
    """cryptography's path validation: the chain it built, or why it failed."""
    try:
        verifier = (
            x509v.PolicyBuilder()
            .store(x509v.Store(list(roots)))
            .time(at)
            .extension_policies(
                ca_policy=x509v.ExtensionPolicy.webpki_defaults_ca(),
                ee_policy=x509v.ExtensionPolicy.permit_all(),
            )
            .build_client_verifier()
        )
        return verifier.verify(leaf, list(reversed(bundle))).chain, None
    except x509v.VerificationError as exc:
        return None, f"X.509 path validation failed: {exc}"


def _diagnose_links(
    path: list[x509.Certificate], roots: Sequence[x509.Certificate], reasons: list[str]
) -> x509.Certificate | None:
    """Check each link of ``path`` and find its anchor; report every broken link.

    Returns the trusted root that issued ``path[-1]`` when that is how the path
    is anchored, else ``None``.
    """
    n = len(path)

    def label(i: int) -> str:
        return _label(i, n, anchored_by_root=False)

    for i in range(n - 1):
        try:
            path[i].verify_directly_issued_by(path[i + 1])
        except (ValueError, TypeError, InvalidSignature) as exc:
            detail = str(exc) or "signature does not verify"
            reasons.append(f"{label(i)} is not issued by {label(i + 1)}: {detail}")
    top_der = _der(path[-1])
    if any(_der(root) == top_der for root in roots):
        return None
    for root in roots:
        try:
            path[-1].verify_directly_issued_by(root)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return root
    reasons.append(f"{label(n - 1)} {_NOT_ANCHORED}")
    return None


def _check_chain(
    leaf: x509.Certificate,
    bundle: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    at: dt.datetime,
) -> tuple[tuple[x509.Certificate, ...], list[str]]:
    """Validate ``[leaf, *reversed(bundle)]`` to one of ``roots`` at ``at``.

    cryptography's RFC 5280 validator checks names, signatures and its own
    profile; the path it builds must be exactly ours (plus, possibly, the
    trusted root that issued ``cabundle[0]``). Then every certificate goes
    through the explicit checks of :func:`_check_certificate`. Only when the
    validator refuses or builds another path are the links re-checked one by
    one, to say which one is broken.
    """
    reasons: list[str] = []
    path = [leaf, *reversed(bundle)]
    built, failure = _rfc5280_path(leaf, bundle, roots, at)
    anchored_by_root = False
    if built is not None:
        # Certificate equality compares the DER encodings.
        if len(built) == len(path) + 1 and built[:-1] == path:
            path.append(built[-1])
            anchored_by_root = True
        elif built != path:
            failure = "X.509 path validation chose a chain other than [leaf, cabundle reversed]"
    if failure is not None:
        root = _diagnose_links(path, roots, reasons)
        if root is not None:
            path.append(root)
            anchored_by_root = True
    for i, cert in enumerate(path):
        _check_certificate(cert, _label(i, len(path), anchored_by_root), i, at, reasons)
    if failure is not None:
        # Our own findings lead (they name the certificate and the broken property);
        # the validator's message follows, in words, unless it only says that no
        # path to a root exists, which a reason above already says precisely.
        unanchored = any(r.endswith(_NOT_ANCHORED) for r in reasons)
        if not (unanchored and "candidates exhausted" in failure):
            reasons.append(_readable_failure(failure, path, anchored_by_root))
    return tuple(path), reasons


_NOT_ANCHORED = "is neither a trusted root nor issued by one"
#: How cryptography's validator names a certificate in its messages (a Python repr).
_CERT_REPR = re.compile(r"<Certificate\(subject=<Name\((?P<subject>.*?)\)>, \.\.\.\)>")


def _readable_failure(failure: str, path: Sequence[x509.Certificate], anchored_by_root: bool) -> str:
    """The validator's message with each certificate named by its place in the chain."""
    subjects: dict[str, str] = {}
    for i, cert in enumerate(path):
        with contextlib.suppress(ValueError):
            subjects.setdefault(cert.subject.rfc4514_string(), _label(i, len(path), anchored_by_root))

    def name(m: re.Match[str]) -> str:
        subject = m.group("subject")
        label = subjects.get(subject)
        return f"the {label} ({subject})" if label else f"the certificate {subject}"

    text = failure.replace("validation failed: validation failed: ", "validation failed: ")
    text = _CERT_REPR.sub(name, text)
    return re.sub(r"<[A-Za-z]+\((.*?)\)>", r"\1", text)  # any other repr: its contents only


# -- arguments -----------------------------------------------------------------------


def _roots(roots: Iterable[x509.Certificate] | None) -> list[x509.Certificate]:
    if roots is None:
        return [_AWS_ROOT]
    result = list(roots)
    if not result:
        raise ValueError("roots is empty: nothing would be trusted")
    for root in result:
        if not isinstance(root, x509.Certificate):
            raise TypeError(f"roots must be x509.Certificate objects, not {type(root).__name__}")
    return result


def _instant(at: dt.datetime | None) -> dt.datetime:
    if at is None:
        return dt.datetime.now(dt.UTC)
    if not isinstance(at, dt.datetime):
        raise TypeError("at must be a datetime")
    # A naive datetime is taken as UTC, as cryptography does.
    return at.replace(tzinfo=dt.UTC) if at.tzinfo is None else at.astimezone(dt.UTC)


def _duration(value: dt.timedelta | float | None, name: str) -> dt.timedelta | None:
    if value is None:
        return None
    if isinstance(value, dt.timedelta):
        result = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        try:
            result = dt.timedelta(seconds=value)
        except (OverflowError, ValueError):  # inf, nan, beyond timedelta's range
            raise ValueError(f"{name} must be a finite number of seconds") from None
    else:
        raise TypeError(f"{name} must be a timedelta or a number of seconds")
    if result < dt.timedelta(0):
        raise ValueError(f"{name} must not be negative")
    return result


def _expected_pcrs(expected: Mapping[int, bytes] | None) -> dict[int, bytes]:
    if expected is None:
        return {}
    result: dict[int, bytes] = {}
    for index, value in expected.items():
        if not _is_uint(index) or index >= MAX_PCRS:
            raise ValueError(f"expected PCR index {index!r} is not in 0..{MAX_PCRS - 1}")
        if not isinstance(value, bytes | bytearray | memoryview):
            raise TypeError(f"expected PCR{index} must be bytes")
        result[index] = bytes(value)
    return result


# -- the recipe ----------------------------------------------------------------------


def verify_document(
    doc: bytes,
    *,
    roots: Iterable[x509.Certificate] | None = None,
    at: dt.datetime | None = None,
    expected_pcrs: Mapping[int, bytes] | None = None,
    nonce: bytes | None = None,
    max_age: dt.timedelta | float | None = None,
    clock_skew: dt.timedelta | float = DEFAULT_CLOCK_SKEW,
) -> VerifiedDocument:
    """Verify an attestation document and return its contents, or raise.

    ``roots`` are the trusted root certificates (default: the shipped AWS Nitro
    root only). ``at`` is the verification time (default: now; a naive datetime
    is UTC). ``expected_pcrs`` maps PCR indexes to the exact values required;
    ``nonce`` is the value the document must carry; ``max_age`` (timedelta or
    seconds) bounds how long before ``at`` the document may have been made;
    ``clock_skew`` bounds how far after ``at`` its timestamp may lie.

    Raises :class:`VerificationError` listing every reason the document is not
    trusted. Only arguments other than ``doc`` can raise anything else.
    """
    if not isinstance(doc, bytes | bytearray | memoryview):
        raise TypeError(f"doc must be bytes, not {type(doc).__name__}")
    trusted = _roots(roots)
    when = _instant(at)
    pcr_policy = _expected_pcrs(expected_pcrs)
    age_limit = _duration(max_age, "max_age")
    skew = _duration(clock_skew, "clock_skew")
    assert skew is not None
    if nonce is not None and not isinstance(nonce, bytes | bytearray | memoryview):
        raise TypeError("nonce must be bytes")
    expected_nonce = None if nonce is None else bytes(nonce)

    unverified = parse_unverified(doc)
    reasons = list(unverified.problems)
    try:
        chain = _verify_parsed(
            unverified, reasons, trusted, when, pcr_policy, expected_nonce, age_limit, skew
        )
    except Exception as exc:  # fail closed
        reasons.append(f"internal error while verifying: {_strict_cbor.shown(exc, 200)}")
        chain = None
    if reasons or chain is None:
        raise VerificationError(reasons)
    u = unverified
    assert u.module_id is not None and u.digest is not None and u.timestamp is not None
    assert u.pcrs is not None and u.certificate is not None and u.cabundle is not None
    time = u.time
    assert time is not None
    return VerifiedDocument(
        module_id=u.module_id,
        digest=u.digest,
        timestamp=u.timestamp,
        time=time,
        pcrs=u.pcrs,
        certificate=u.certificate,
        cabundle=u.cabundle,
        chain=chain,
        public_key=u.public_key,
        user_data=u.user_data,
        nonce=u.nonce,
    )


def _verify_parsed(
    u: UnverifiedDocument,
    reasons: list[str],
    roots: Sequence[x509.Certificate],
    at: dt.datetime,
    expected_pcrs: Mapping[int, bytes],
    expected_nonce: bytes | None,
    max_age: dt.timedelta | None,
    skew: dt.timedelta,
) -> tuple[x509.Certificate, ...] | None:
    """Steps 2-4; appends to ``reasons`` and returns the chain it checked."""
    chain: tuple[x509.Certificate, ...] | None = None
    bundle = [c for c in u.bundle if c is not None]
    if u.leaf is not None and bundle and len(bundle) == len(u.bundle):
        chain, chain_reasons = _check_chain(u.leaf, bundle, roots, at)
        reasons.extend(chain_reasons)
    elif u.leaf is not None and not u.problems:
        reasons.append("no usable cabundle to check the leaf certificate against")

    # Step 3: the signature, even when the chain failed, so both are reported.
    if u.leaf is not None and None not in (u.protected, u.payload, u.signature):
        assert u.protected is not None and u.payload is not None and u.signature is not None
        key = u.leaf.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP384R1):
            reasons.append("COSE signature not checked: the leaf key is not ECDSA P-384")
        elif not cose.verify_es384(key, u.protected, u.payload, u.signature):
            reasons.append("COSE signature does not verify with the leaf certificate's key")

    # Step 4: policy.
    time = u.time
    if u.timestamp is not None and time is None:
        reasons.append("timestamp is beyond the year 9999")
    if time is not None:
        if u.leaf is not None and not (u.leaf.not_valid_before_utc <= time <= u.leaf.not_valid_after_utc):
            reasons.append(
                f"timestamp {time.isoformat()} is outside the leaf certificate's validity "
                f"({_when(u.leaf.not_valid_before_utc)} to {_when(u.leaf.not_valid_after_utc)})"
            )
        if time - skew > at:  # (at + skew could overflow near year 9999)
            reasons.append(
                f"timestamp {time.isoformat()} is more than {skew.total_seconds():g} s "
                f"after the verification time {at.isoformat()}"
            )
        if max_age is not None and at - time > max_age:
            reasons.append(
                f"document is {(at - time).total_seconds():.3f} s old, "
                f"older than the allowed {max_age.total_seconds():g} s"
            )
    for index, want in sorted(expected_pcrs.items()):
        if u.pcrs is None:
            reasons.append(f"PCR{index} cannot be checked: the document has no usable pcrs")
            continue
        got = u.pcrs.get(index)
        if got is None:
            reasons.append(f"PCR{index} is not in the document")
        elif not hmac.compare_digest(got, want):
            reasons.append(f"PCR{index} is {got.hex()}, expected {want.hex()}")
    if expected_nonce is not None:
        if u.nonce is None:
            reasons.append("the document has no nonce, one was expected")
        elif not hmac.compare_digest(u.nonce, expected_nonce):
            reasons.append(f"nonce is {_short_hex(u.nonce, 32)}, expected {_short_hex(expected_nonce, 32)}")
    return chain
