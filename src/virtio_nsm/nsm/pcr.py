"""The PCR bank as an immutable value.

Every operation returns a new :class:`PcrBank` (or raises) and never changes
the one it was called on; the device swaps the new value in only once the
whole request has succeeded, which is what makes each request atomic.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from ..errors import ErrorCode
from .protocol import RequestRejected

#: The real device's number of PCRs.
MAX_PCRS: Final = 32
#: PCRs locked from boot (they hold the boot measurements).
BOOT_LOCKED_PCRS: Final = 16


class Digest(enum.Enum):
    """PCR digest algorithms; the value is the wire name."""

    SHA256 = "SHA256"
    SHA384 = "SHA384"
    SHA512 = "SHA512"

    @property
    def size(self) -> int:
        return _SIZES[self]

    def hash(self, data: bytes) -> bytes:
        return hashlib.new(self.value.lower(), data).digest()

    def extend(self, old: bytes, data: bytes) -> bytes:
        """``H(old || data)``: the PCR extend operation (data is not pre-hashed)."""
        h = hashlib.new(self.value.lower(), old)
        h.update(data)
        return h.digest()


_SIZES: Final = {Digest.SHA256: 32, Digest.SHA384: 48, Digest.SHA512: 64}
#: Hash constructors by wire name (a str key hashes faster than an enum member).
_HASHES: Final = {"SHA256": hashlib.sha256, "SHA384": hashlib.sha384, "SHA512": hashlib.sha512}
_new = object.__new__
_set = object.__setattr__


def _rejected(code: ErrorCode, reason: str) -> RequestRejected:
    return RequestRejected(code, reason)


@dataclass(frozen=True, slots=True)
class PcrBank:
    """PCR values and their lock bits. ``locked`` is a bit mask (bit i = PCR i)."""

    digest: Digest
    values: tuple[bytes, ...]
    locked: int

    @classmethod
    def at_boot(
        cls,
        digest: Digest = Digest.SHA384,
        measurements: Mapping[int, bytes] | None = None,
        max_pcrs: int = MAX_PCRS,
    ) -> PcrBank:
        """A bank as a freshly booted enclave has it: 0-15 measured and locked."""
        if not BOOT_LOCKED_PCRS <= max_pcrs <= MAX_PCRS:
            raise ValueError(f"max_pcrs must be between {BOOT_LOCKED_PCRS} and {MAX_PCRS}")
        zero = bytes(digest.size)
        values = [zero] * max_pcrs
        for index, value in (measurements or {}).items():
            if not 0 <= index < BOOT_LOCKED_PCRS:
                raise ValueError(f"boot measurement for PCR{index}: only PCR0-15 are measured at boot")
            if len(value) != digest.size:
                raise ValueError(
                    f"boot measurement for PCR{index} is {len(value)} bytes, "
                    f"{digest.value} PCRs are {digest.size}"
                )
            values[index] = bytes(value)
        return cls(digest, tuple(values), (1 << BOOT_LOCKED_PCRS) - 1)

    def __post_init__(self) -> None:
        if not 1 <= len(self.values) <= MAX_PCRS:
            raise ValueError(f"a PCR bank has 1 to {MAX_PCRS} PCRs")
        if any(len(v) != self.digest.size for v in self.values):
            raise ValueError(f"every {self.digest.value} PCR is {self.digest.size} bytes")
        if not 0 <= self.locked < (1 << len(self.values)):
            raise ValueError("lock bits beyond the last PCR")

    @staticmethod
    def _derived(digest: Digest, values: tuple[bytes, ...], locked: int) -> PcrBank:
        # For values derived from a valid bank by a valid operation: skips the
        # checks of __post_init__, which dominate the cost of an extend.
        bank = _new(PcrBank)
        _set(bank, "digest", digest)
        _set(bank, "values", values)
        _set(bank, "locked", locked)
        return bank

    @property
    def max_pcrs(self) -> int:
        return len(self.values)

    def is_locked(self, index: int) -> bool:
        return bool(self.locked >> index & 1)

    def locked_indices(self) -> list[int]:
        return [i for i in range(len(self.values)) if self.locked >> i & 1]

    def locked_values(self) -> Iterable[tuple[int, bytes]]:
        return ((i, v) for i, v in enumerate(self.values) if self.locked >> i & 1)

    def _check_index(self, index: int) -> None:
        if index >= len(self.values):
            raise _rejected(ErrorCode.InvalidIndex, f"PCR{index} does not exist "
                            f"(the device has {len(self.values)})")

    def describe(self, index: int) -> tuple[bool, bytes]:
        self._check_index(index)
        return bool(self.locked >> index & 1), self.values[index]

    def extend(self, index: int, data: bytes) -> PcrBank:
        values = self.values
        if index >= len(values):
            self._check_index(index)
        if self.locked >> index & 1:
            raise _rejected(ErrorCode.ReadOnlyIndex, f"PCR{index} is locked")
        digest = self.digest
        new = _HASHES[digest._value_](values[index] + data).digest()  # H(old || data)
        return PcrBank._derived(digest, (*values[:index], new, *values[index + 1:]), self.locked)

    def lock(self, index: int) -> PcrBank:
        self._check_index(index)
        if self.locked >> index & 1:
            raise _rejected(ErrorCode.ReadOnlyIndex, f"PCR{index} is already locked")
        return PcrBank._derived(self.digest, self.values, self.locked | 1 << index)

    def lock_range(self, count: int) -> PcrBank:
        """Lock PCRs ``0 .. count-1``; PCRs already locked stay locked."""
        if count > len(self.values):
            raise _rejected(ErrorCode.InvalidIndex, f"range {count} is more than the "
                            f"{len(self.values)} PCRs of the device")
        return PcrBank._derived(self.digest, self.values, self.locked | ((1 << count) - 1))
