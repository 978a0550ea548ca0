"""virtio-nsm: the virtio NitroSecureModule device, its transports, a client and a verifier.

The public API::

    NsmDevice        the sans-IO device: ``handle(request: bytes) -> bytes``
    DeviceState      the device's state as one immutable value
    Digest           PCR digest algorithms
    CertificateAuthority   the local attestation root (generate, load, bring your own)
    Nsm              a client over a transport (in-process device, /dev/nsm, vhost-user)
    NsmError, ErrorCode    an error answer and its code
    verify_document  verify an attestation document (AWS's or ours): VerifiedDocument
                     or VerificationError listing every reason
"""

from .client import Nsm, NsmDescription, PcrDescription
from .errors import ConfigurationError, DeviceNotFoundError, ErrorCode, NsmError, TransportError
from .nsm.device import DeviceState, NsmDevice
from .nsm.pcr import Digest
from .nsm.pki import CertificateAuthority
from .verify import VerificationError, VerifiedDocument, verify_document

__all__ = [
    "CertificateAuthority",
    "ConfigurationError",
    "DeviceNotFoundError",
    "DeviceState",
    "Digest",
    "ErrorCode",
    "Nsm",
    "NsmDescription",
    "NsmDevice",
    "NsmError",
    "PcrDescription",
    "TransportError",
    "VerificationError",
    "VerifiedDocument",
    "verify_document",
]
