"""Enclave measurements: PCR0/1/2/8 of an image, PCR3/4 of its parent (no I/O).

``H`` is SHA-384, ``Z`` 48 zero bytes and ``extend(x) = H(Z || x)``: the value
a PCR holds after one extend from zero. Only section *data* is measured, in
file order, as nitro-cli and QEMU both do:

* PCR0 = extend(H(kernel || cmdline || every ramdisk))
* PCR1 = extend(H(kernel || cmdline || first ramdisk))
* PCR2 = extend(H(the other ramdisks))
* PCR3 = extend(UTF-8 of the parent's IAM role ARN) (not hashed first)
* PCR4 = extend(the parent's instance id)
* PCR8 = extend(H(DER of the signing certificate)), signed images only
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Final

from .format import SectionType

PCR_SIZE: Final = 48
ZERO: Final = bytes(PCR_SIZE)
#: What nitro-cli prints as ``HashAlgorithm`` (Rust's Debug form of its hasher).
HASH_ALGORITHM: Final = "Sha384 { ... }"


def extend(data: bytes) -> bytes:
    """``H(Z || data)``: a zero PCR extended once with ``data``."""
    return hashlib.sha384(ZERO + data).digest()


def pcr_of_role(role_arn: str) -> bytes:
    """PCR3 of an enclave whose parent instance has the IAM role ``role_arn``."""
    return extend(role_arn.encode("utf-8"))


def pcr_of_instance(instance_id: str) -> bytes:
    """PCR4 of an enclave started on the instance ``instance_id``."""
    return extend(instance_id.encode("utf-8"))


def pcr_of_certificate_der(der: bytes) -> bytes:
    """PCR8 of an image signed with the certificate whose DER encoding is ``der``."""
    return extend(hashlib.sha384(der).digest())


def pcr_of_bytes(data: bytes) -> bytes:
    """What ``nitro-cli pcr --input`` prints for a file holding ``data``."""
    return extend(hashlib.sha384(data).digest())


@dataclass(frozen=True)
class Measurements:
    """PCR values of an image (``pcr8`` only when it is signed)."""

    pcr0: bytes
    pcr1: bytes
    pcr2: bytes
    pcr8: bytes | None = None

    def as_dict(self) -> dict[int, bytes]:
        values = {0: self.pcr0, 1: self.pcr1, 2: self.pcr2}
        if self.pcr8 is not None:
            values[8] = self.pcr8
        return values

    def to_json(self) -> dict[str, str]:
        """nitro-cli's ``Measurements`` object (keys in its order)."""
        out = {"HashAlgorithm": HASH_ALGORITHM}
        out.update({f"PCR{i}": v.hex() for i, v in self.as_dict().items()})
        return out


class Measurer:
    """Feeds section data, in file order, into the hashes the PCRs need.

    Call :meth:`begin` with each section's type, :meth:`update` with its data
    in any number of chunks, then :meth:`result`. Each chunk goes into the two
    hashes that cover it (PCR0 and PCR1, or PCR0 and PCR2) in one pass.
    """

    __slots__ = ("_app", "_boot", "_image", "_ramdisks", "_targets")

    def __init__(self) -> None:
        self._image = hashlib.sha384()
        self._boot = hashlib.sha384()
        self._app = hashlib.sha384()
        self._ramdisks = 0
        self._targets: tuple[hashlib._Hash, ...] = ()

    def begin(self, section_type: SectionType) -> None:
        if section_type in (SectionType.KERNEL, SectionType.CMDLINE):
            self._targets = (self._image, self._boot)
        elif section_type is SectionType.RAMDISK:
            self._targets = (self._image, self._boot if self._ramdisks == 0 else self._app)
            self._ramdisks += 1
        else:
            self._targets = ()

    @property
    def targets(self) -> tuple[hashlib._Hash, ...]:
        """The hashes the current section's data goes into (for callers that feed them in parallel)."""
        return self._targets

    def update(self, chunk: bytes | memoryview) -> None:
        for target in self._targets:
            target.update(chunk)

    def result(self, certificate_der: bytes | None = None) -> Measurements:
        pcr8 = None if certificate_der is None else pcr_of_certificate_der(certificate_der)
        return Measurements(
            extend(self._image.digest()),
            extend(self._boot.digest()),
            extend(self._app.digest()),
            pcr8,
        )
