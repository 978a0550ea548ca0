"""Enclave image files (EIF): read, measure, build and sign them as AWS's tools do.

* :func:`read_eif` checks an image's layout and CRC and measures it in one
  streamed pass (:class:`EifImage`: PCR0/1/2/8, metadata, signature);
* :func:`build_eif` writes an image in AWS's builder layout, optionally signed;
  :func:`sign_eif` adds or replaces the signature of an existing image;
* :func:`boot_measurements` turns an image and its parent's identity into the
  boot PCRs a device reports (``NsmDevice(boot_measurements=...)``);
* :mod:`.measure` has the PCR formulas (PCR3 of a role ARN, PCR4 of an instance
  id, PCR8 of a certificate).

Malformed images raise :class:`EifError` with a message that names the problem.
Versions 2, 3 and 4 are read (the header layout is the same in all three).
"""

from .boot import BootConfig, boot_measurements
from .format import CURRENT_VERSION, SUPPORTED_VERSIONS, Arch, EifError, Header, SectionType
from .measure import (
    Measurements,
    Measurer,
    extend,
    pcr_of_bytes,
    pcr_of_certificate_der,
    pcr_of_instance,
    pcr_of_role,
)
from .metadata import Identity
from .reader import EifImage, Section, read_eif, read_stream
from .signature import PcrSignature, SignatureCheck, Signer
from .writer import BuildResult, build_eif, build_stream, sign_eif, sign_stream

__all__ = [
    "CURRENT_VERSION",
    "SUPPORTED_VERSIONS",
    "Arch",
    "BootConfig",
    "BuildResult",
    "EifError",
    "EifImage",
    "Header",
    "Identity",
    "Measurements",
    "Measurer",
    "PcrSignature",
    "Section",
    "SectionType",
    "SignatureCheck",
    "Signer",
    "boot_measurements",
    "build_eif",
    "build_stream",
    "extend",
    "pcr_of_bytes",
    "pcr_of_certificate_der",
    "pcr_of_instance",
    "pcr_of_role",
    "read_eif",
    "read_stream",
    "sign_eif",
    "sign_stream",
]
