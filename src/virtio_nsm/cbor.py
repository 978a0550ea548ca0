"""Small helpers for writing CBOR heads by hand.

The device answers in the exact shape serde_cbor produces (shortest heads,
definite lengths, declaration-order keys); building the hot responses from
these heads keeps that shape explicit and avoids a generic encoder call.
"""

from __future__ import annotations

MAJOR_UINT = 0
MAJOR_NINT = 1
MAJOR_BYTES = 2
MAJOR_TEXT = 3
MAJOR_ARRAY = 4
MAJOR_MAP = 5


def head(major: int, value: int) -> bytes:
    """The shortest CBOR head for ``major`` type and argument ``value``."""
    if value < 0:
        raise ValueError("CBOR head argument must be non-negative")
    mt = major << 5
    if value < 24:
        return bytes((mt | value,))
    if value < 0x100:
        return bytes((mt | 24, value))
    if value < 0x10000:
        return bytes((mt | 25,)) + value.to_bytes(2, "big")
    if value < 0x100000000:
        return bytes((mt | 26,)) + value.to_bytes(4, "big")
    if value < 0x10000000000000000:
        return bytes((mt | 27,)) + value.to_bytes(8, "big")
    raise ValueError("CBOR head argument does not fit in 64 bits")


def uint(value: int) -> bytes:
    return head(MAJOR_UINT, value)


def bstr(data: bytes) -> bytes:
    return head(MAJOR_BYTES, len(data)) + data


def tstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    return head(MAJOR_TEXT, len(raw)) + raw


def array_head(n: int) -> bytes:
    return head(MAJOR_ARRAY, n)


def map_head(n: int) -> bytes:
    return head(MAJOR_MAP, n)


NULL = b"\xf6"
TRUE = b"\xf5"
FALSE = b"\xf4"
