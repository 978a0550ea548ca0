"""Exceptions raised by virtio-nsm.

::

    NsmError                 an NSM request failed; carries the ErrorCode
    ConfigurationError       a device, CA or state setting cannot be used
    TransportError           a transport to a device cannot be opened or broke
      DeviceNotFoundError    the device node or socket does not exist

The verifier raises :class:`virtio_nsm.verify.VerificationError`; the virtio and
vhost-user layers have their own errors in their packages.
"""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """NSM error codes: wire names verbatim, numeric values as in the C ABI."""

    Success = 0
    InvalidArgument = 1
    InvalidIndex = 2
    InvalidResponse = 3
    ReadOnlyIndex = 4
    InvalidOperation = 5
    BufferTooSmall = 6
    InputTooLarge = 7
    InternalError = 8


class NsmError(Exception):
    """An NSM request answered with an error (or an answer that is not valid).

    ``code`` is the device's :class:`ErrorCode`; a malformed answer is reported
    as :attr:`ErrorCode.InvalidResponse`, as the AWS client does.
    """

    def __init__(self, code: ErrorCode, detail: str | None = None) -> None:
        self.code = code
        self.detail = detail
        super().__init__(code.name if detail is None else f"{code.name}: {detail}")


class ConfigurationError(ValueError):
    """A device, CA or state setting is invalid."""


class TransportError(OSError):
    """A transport to an NSM device cannot be opened or failed mid-request."""


class DeviceNotFoundError(TransportError):
    """The NSM device node or socket does not exist."""
