"""``nsm verify`` and ``nsm inspect``: argument handling and output only.

Exit status of ``verify``: 0 valid, 1 invalid, 2 usage or I/O error.
Exit status of ``inspect``: 0 no syntax problem found, 1 problems found
(the signature and the chain are never checked), 2 usage or I/O error.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import SignatureAlgorithmOID

from virtio_nsm.cli import main
from virtio_nsm.cli.inputs import InputError, read_input
from virtio_nsm.verify import (
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    UnverifiedDocument,
    VerificationError,
    VerifiedDocument,
    load_pem_roots,
    parse_unverified,
    verify_document,
)

_KNOWN_FIELDS = frozenset((*REQUIRED_FIELDS, *OPTIONAL_FIELDS))
_BASE64 = re.compile(rb"[A-Za-z0-9+/=_\-\s]+")


class _InputError(click.ClickException):
    """The document or a root file cannot be read (exit status 2, like usage errors)."""

    exit_code = 2


def read_document(path: str) -> bytes:
    """The document bytes from a file (or ``-`` for stdin), raw CBOR or base64."""
    try:
        data = read_input(path, what="standard input" if path == "-" else path)
    except InputError as exc:
        raise _InputError(str(exc)) from None
    # Raw COSE starts with 0x84 or 0xd2, never with a base64 character, so text
    # made only of base64 characters is base64 (standard or URL-safe).
    if data.strip() and _BASE64.fullmatch(data):
        text = re.sub(rb"\s", b"", data).replace(b"-", b"+").replace(b"_", b"/").rstrip(b"=")
        text += b"=" * (-len(text) % 4)
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            return data  # not base64 after all: let the verifier say what it is
    return data


def parse_time(value: str) -> dt.datetime:
    """ISO 8601 (naive means UTC) or integer milliseconds since the epoch."""
    text = value.strip()
    try:
        if re.fullmatch(r"[0-9]+", text):
            when = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(milliseconds=int(text))
            if int(text) < 100_000_000_000:
                click.echo(f"note: --at {text} is read as milliseconds: {_iso(when)}", err=True)
            return when
        parsed = dt.datetime.fromisoformat(text)
    except (ValueError, OverflowError) as exc:
        raise click.BadParameter(f"{value!r} is not ISO 8601 or epoch milliseconds ({exc})") from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed


def _parse_hex(value: str, what: str) -> bytes:
    text = value.strip().removeprefix("0x")
    try:
        return bytes.fromhex(text)
    except ValueError:
        raise click.BadParameter(f"{what} {value!r} is not hexadecimal") from None


def parse_pcrs(values: Sequence[str]) -> dict[int, bytes]:
    pcrs: dict[int, bytes] = {}
    for item in values:
        index_text, sep, hex_text = item.partition("=")
        if not sep or not re.fullmatch(r"\s*[0-9]+\s*", index_text):
            raise click.BadParameter(f"{item!r} is not N=HEX", param_hint="--pcr")
        index = int(index_text)
        if index >= 32:
            raise click.BadParameter(f"PCR index {index} is not in 0..31", param_hint="--pcr")
        value = _parse_hex(hex_text, f"PCR{index} value")
        if pcrs.get(index, value) != value:
            raise click.BadParameter(f"PCR{index} given twice", param_hint="--pcr")
        pcrs[index] = value
    return pcrs


def _load_roots(paths: Sequence[str]) -> list[x509.Certificate] | None:
    if not paths:
        return None
    roots: list[x509.Certificate] = []
    for path in paths:
        try:
            data = read_input(path, allow_stdin=False)
        except InputError as exc:
            raise _InputError(str(exc)) from None
        try:
            roots.extend(load_pem_roots(data))
        except ValueError as exc:
            raise _InputError(f"{path} holds no usable PEM certificate: {exc}") from None
    return roots


def _iso(t: dt.datetime) -> str:
    text = t.astimezone(dt.UTC).isoformat(timespec="milliseconds")
    return text.replace("+00:00", "Z")


def _name(name: Callable[[], x509.Name]) -> str:
    try:
        return name().rfc4514_string()
    except ValueError as exc:  # inspect shows certificates that were never validated
        return f"(unreadable name: {exc})"


def _subject(cert: x509.Certificate) -> str:
    return _name(lambda: cert.subject)


def _issuer(cert: x509.Certificate) -> str:
    return _name(lambda: cert.issuer)


def _cert_json(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": _subject(cert),
        "issuer": _issuer(cert),
        "not_before": _iso(cert.not_valid_before_utc),
        "not_after": _iso(cert.not_valid_after_utc),
    }


def _opt_hex(value: bytes | None) -> str | None:
    return None if value is None else value.hex()


def _size(value: bytes | None) -> str:
    return "absent" if value is None else f"{len(value)} bytes"


def _document_json(doc: VerifiedDocument) -> dict[str, Any]:
    return {
        "module_id": doc.module_id,
        "digest": doc.digest,
        "timestamp": doc.timestamp,
        "time": _iso(doc.time),
        "pcrs": {str(i): v.hex() for i, v in doc.pcrs.items()},
        "chain": [_cert_json(c) for c in doc.chain],
        "public_key": _opt_hex(doc.public_key),
        "user_data": _opt_hex(doc.user_data),
        "nonce": _opt_hex(doc.nonce),
    }


def _pcr_lines(pcrs: Mapping[int, bytes]) -> list[str]:
    return [f"  {index:>2}  {value.hex()}" for index, value in pcrs.items()]


def _chain_lines(chain: Sequence[x509.Certificate]) -> list[str]:
    lines = []
    for i, cert in enumerate(chain):
        role = "leaf" if i == 0 else "root" if i == len(chain) - 1 else f"ca {len(chain) - 1 - i}"
        validity = f"{_iso(cert.not_valid_before_utc)} .. {_iso(cert.not_valid_after_utc)}"
        lines.append(f"  {role:<5} {_subject(cert)}")
        lines.append(f"        valid {validity}")
    return lines


def _human(doc: VerifiedDocument) -> str:
    lines = [
        "attestation document is VALID",
        f"module_id   {doc.module_id}",
        f"time        {_iso(doc.time)} (timestamp {doc.timestamp} ms)",
        f"digest      {doc.digest}",
        f"PCRs        {len(doc.pcrs)}",
        *_pcr_lines(doc.pcrs),
        "chain",
        *_chain_lines(doc.chain),
        f"public_key  {_size(doc.public_key)}",
        f"user_data   {_size(doc.user_data)}",
        f"nonce       {_size(doc.nonce)}",
    ]
    return "\n".join(lines)


@main.command()
@click.argument("doc", metavar="DOC")
@click.option(
    "--root",
    "roots",
    multiple=True,
    metavar="PEM",
    help="Trusted root certificate(s) in PEM; repeatable. Default: the AWS Nitro root.",
)
@click.option("--at", "at", metavar="TIME", help="Verification time: ISO 8601 or epoch ms.")
@click.option("--pcr", "pcrs", multiple=True, metavar="N=HEX", help="Expected PCR value.")
@click.option("--nonce", metavar="HEX", help="Nonce the document must carry.")
@click.option(
    "--max-age",
    type=click.FloatRange(min=0),
    metavar="SECONDS",
    help="Maximum age of the document's timestamp at the verification time.",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def verify(
    doc: str,
    roots: tuple[str, ...],
    at: str | None,
    pcrs: tuple[str, ...],
    nonce: str | None,
    max_age: float | None,
    as_json: bool,
) -> None:
    """Verify the attestation document DOC (raw CBOR or base64 file, - for stdin).

    Exit status: 0 valid, 1 invalid (reasons on stderr, or in the JSON),
    2 usage or I/O error.
    """
    when = parse_time(at) if at is not None else None
    expected = parse_pcrs(pcrs)
    expected_nonce = _parse_hex(nonce, "--nonce") if nonce is not None else None
    trusted = _load_roots(roots)
    data = read_document(doc)
    try:
        result = verify_document(
            data,
            roots=trusted,
            at=when,
            expected_pcrs=expected,
            nonce=expected_nonce,
            max_age=max_age,
        )
    except (ValueError, TypeError) as exc:  # an argument verify_document refuses
        raise click.UsageError(str(exc)) from None
    except VerificationError as exc:
        if as_json:
            click.echo(json.dumps({"valid": False, "reasons": exc.reasons, "document": None}, indent=2))
        else:
            click.echo("attestation document is INVALID:", err=True)
            for reason in exc.reasons:
                click.echo(f"  - {reason}", err=True)
            for hint in _hints(exc.reasons, data, trusted):
                click.echo(f"hint: {hint}", err=True)
        sys.exit(1)
    if as_json:
        out = {"valid": True, "reasons": [], "document": _document_json(result)}
        click.echo(json.dumps(out, indent=2))
    else:
        click.echo(_human(result))


_PCR_ABSENT = re.compile(r"PCR(\d+) is not in the document")


def _hints(reasons: Sequence[str], data: bytes, trusted: Sequence[x509.Certificate] | None) -> list[str]:
    """What to do about the usual mistakes: the wrong root, an unlocked PCR."""
    hints = []
    if any(r.endswith("is neither a trusted root nor issued by one") for r in reasons):
        bundle = [c for c in parse_unverified(data).bundle if c is not None]
        top = f"goes up to {_issuer(bundle[0])}" if bundle else "has no usable cabundle"
        names = ", ".join(_subject(r) for r in trusted) if trusted else "the AWS Nitro root"
        hints.append(
            f"the document's chain {top}, but only {names} is trusted. Documents from AWS "
            "verify with no --root; documents from this project's devices verify with their "
            "root: `nsm ca root > root.pem` then --root root.pem, or --root DIR/ca/root.pem for "
            "`nsm serve --state-dir DIR`"
        )
    absent = [m.group(1) for r in reasons if (m := _PCR_ABSENT.fullmatch(r))]
    if absent:
        pcrs = ", ".join(f"PCR{i}" for i in absent)
        hints.append(
            f"documents carry only locked PCRs, as on a real NSM: {pcrs} must be locked "
            f"(nsm pcr lock {absent[0]}) before the document is made"
        )
    return hints


def _describe_key(cert: x509.Certificate) -> str:
    key = cert.public_key()
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"EC {key.curve.name}"
    return type(key).__name__


def _algorithm(cert: x509.Certificate) -> str:
    oid = cert.signature_algorithm_oid
    if oid == SignatureAlgorithmOID.ECDSA_WITH_SHA384:
        return "ecdsa-with-SHA384"
    return oid.dotted_string


def _inspect_cert(label: str, cert: x509.Certificate | None) -> list[str]:
    if cert is None:
        return [f"  {label}: (unreadable)"]
    return [
        f"  {label}: {_subject(cert)}",
        f"      issuer  {_issuer(cert)}",
        f"      valid   {_iso(cert.not_valid_before_utc)} .. {_iso(cert.not_valid_after_utc)}",
        f"      key     {_describe_key(cert)}, signed {_algorithm(cert)}",
    ]


def _inspect_lines(u: UnverifiedDocument) -> list[str]:
    lines = ["attestation document (NOT verified)"]
    if u.tagged is not None:
        lines.append(f"COSE_Sign1   {'tag 18' if u.tagged else 'untagged'}")
    if u.protected is not None:
        lines.append(f"protected   h'{u.protected.hex()}'")
    if u.unprotected is not None:
        lines.append(f"unprotected {len(u.unprotected)} entries")
    if u.signature is not None:
        lines.append(f"signature   {len(u.signature)} bytes")
    if u.payload is not None:
        lines.append(f"payload     {len(u.payload)} bytes")
    if u.module_id is not None:
        lines.append(f"module_id   {u.module_id}")
    if u.timestamp is not None:
        time = u.time
        shown = _iso(time) if time is not None else "not representable"
        hint = " — looks like seconds, not ms" if u.timestamp < 100_000_000_000 else ""
        lines.append(f"time        {shown} (timestamp {u.timestamp} ms{hint})")
    if u.digest is not None:
        lines.append(f"digest      {u.digest}")
    if u.pcrs is not None:
        lines.append(f"PCRs        {len(u.pcrs)}")
        lines.extend(_pcr_lines(u.pcrs))
    if u.leaf is not None or u.bundle:
        lines.append("certificates (leaf, then cabundle in document order)")
        if u.leaf is not None:
            lines.extend(_inspect_cert("leaf", u.leaf))
        for i, cert in enumerate(u.bundle):
            lines.extend(_inspect_cert(f"cabundle[{i}]", cert))
    for name in ("public_key", "user_data", "nonce"):
        if name in u.fields:
            lines.append(f"{name:<11} {_size(getattr(u, name))}")
    extra = [k for k in u.fields if k not in _KNOWN_FIELDS]
    if extra:
        lines.append(f"unknown fields: {', '.join(repr(k) for k in extra)}")
    return lines


def _inspect_json(u: UnverifiedDocument) -> dict[str, Any]:
    def cert(c: x509.Certificate | None) -> dict[str, Any] | None:
        return None if c is None else {**_cert_json(c), "key": _describe_key(c), "signature": _algorithm(c)}

    time = u.time
    return {
        "verified": False,
        "problems": list(u.problems),
        "tagged": u.tagged,
        "protected": _opt_hex(u.protected),
        "signature": _opt_hex(u.signature),
        "module_id": u.module_id,
        "digest": u.digest,
        "timestamp": u.timestamp,
        "time": None if time is None else _iso(time),
        "pcrs": None if u.pcrs is None else {str(i): v.hex() for i, v in u.pcrs.items()},
        "certificate": cert(u.leaf),
        "cabundle": [cert(c) for c in u.bundle],
        "public_key": _opt_hex(u.public_key),
        "user_data": _opt_hex(u.user_data),
        "nonce": _opt_hex(u.nonce),
        "unknown_fields": [repr(k) for k in u.fields if k not in _KNOWN_FIELDS],
    }


@main.command()
@click.argument("doc", metavar="DOC")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output on stdout.")
def inspect(doc: str, as_json: bool) -> None:
    """Decode the attestation document DOC without verifying it.

    Shows what can be decoded and lists syntax problems. Exit status: 0 no
    problem found (signature and chain are NOT checked), 1 problems found,
    2 I/O error.
    """
    u = parse_unverified(read_document(doc))
    if as_json:
        click.echo(json.dumps(_inspect_json(u), indent=2))
    else:
        click.echo("\n".join(_inspect_lines(u)))
        if u.problems:
            click.echo("problems:")
            for problem in u.problems:
                click.echo(f"  - {problem}")
        else:
            click.echo("no syntax problems (signature, chain and times not checked: use nsm verify)")
    if u.problems:
        sys.exit(1)
