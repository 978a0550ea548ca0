"""A deliberately small, strict CBOR reader for signed attestation payloads.

The verifier decides trust from the values in a signed payload, so it reads
that payload with a decoder whose behaviour is fully known rather than a
general-purpose one that interprets tags (bignums, dates, shared references)
and folds equal keys together. What this reader accepts:

* unsigned and negative integers, byte and text strings, arrays and maps,
  each with a definite or an indefinite length (AWS switched the payload map
  to indefinite length in 2026), heads in any width;
* ``false``, ``true``, ``null`` and floating-point numbers (the latter only so
  an unknown extra field cannot make a document unreadable).

What it rejects: tags, other simple values (``undefined`` included, unless
``allow_simple``), a map key that equals an earlier key of the same map (Python
equality, so ``1`` and ``true`` collide too), an array or a map as a map key,
invalid UTF-8, nesting deeper than ``max_depth``, a length longer than the
remaining input, and trailing bytes.

It is the one decoder for untrusted CBOR in this package: guest requests
(:mod:`virtio_nsm.nsm.protocol`), device answers, attestation documents
(:mod:`virtio_nsm.cose`, :mod:`virtio_nsm.verify`) and state snapshots. It has
no tag semantics at all -- in particular no shared references (tags 28/29),
with which a few hundred bytes describe a structure that doubles per level --
so what it builds is never larger than its input: every item costs at least one
input byte, every length is checked against the bytes that remain before
anything is allocated, and nesting is bounded. The cost of a decode is linear
in the input size. Error messages name positions and types, and show at most
a short prefix of any decoded value (:func:`shown`).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Final

#: Nitro payloads nest three levels (map → map/array → bytes); leave headroom.
DEFAULT_MAX_DEPTH: Final = 16

_BREAK: Final = 0xFF


#: Longest rendering of a decoded value in an error message.
SHOWN_LIMIT: Final = 40


class StrictCborError(ValueError):
    """The bytes are not CBOR this reader accepts; the message says where and why."""


class TrailingBytes(StrictCborError):
    """One item decoded, but ``count`` bytes follow it."""

    def __init__(self, count: int) -> None:
        self.count = count
        super().__init__(f"{count} trailing bytes after the item")


@dataclass(frozen=True, slots=True)
class Simple:
    """A simple value other than false/true/null/floats (``undefined`` is 23).

    Only produced with ``allow_simple``; no field of any NSM message has this
    type, so it can only sit in a place that is ignored.
    """

    value: int


UNDEFINED: Final = Simple(23)


def shown(value: object, limit: int = SHOWN_LIMIT) -> str:
    """``repr(value)`` cut to ``limit`` characters, for error messages.

    Containers are described by type and size, never rendered: a message must
    not grow with what an attacker sent.
    """
    if isinstance(value, list | tuple | dict):
        return f"<{type(value).__name__} of {len(value)}>"
    if isinstance(value, str | bytes) and len(value) > limit:
        value = value[:limit]
        text = repr(value)
        return text + "…"
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "…"


class _Reader:
    __slots__ = ("allow_simple", "data", "items", "max_depth", "pos")

    def __init__(self, data: bytes, max_depth: int, allow_simple: bool = False) -> None:
        self.data = data
        self.pos = 0
        self.max_depth = max_depth
        self.allow_simple = allow_simple
        #: Items decoded so far (never more than the bytes read).
        self.items = 0

    def fail(self, message: str, at: int | None = None) -> StrictCborError:
        return StrictCborError(f"{message} (at byte {self.pos if at is None else at})")

    def take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail(f"needs {n} bytes but only {len(self.data) - self.pos} remain")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def argument(self, info: int, start: int) -> int | None:
        """The head's argument; ``None`` for the indefinite-length marker."""
        if info < 24:
            return info
        if info == 31:
            return None
        if info > 27:
            raise self.fail(f"reserved additional information {info}", start)
        return int.from_bytes(self.take(1 << (info - 24)), "big")

    def item(self, depth: int) -> Any:
        if depth > self.max_depth:
            raise self.fail(f"nesting deeper than {self.max_depth}")
        start = self.pos
        initial = self.take(1)[0]
        self.items += 1
        major, info = initial >> 5, initial & 0x1F
        if major == 7:
            return self.simple(info, start)
        arg = self.argument(info, start)
        if major == 0:
            if arg is None:
                raise self.fail("indefinite-length integer", start)
            return arg
        if major == 1:
            if arg is None:
                raise self.fail("indefinite-length integer", start)
            return -1 - arg
        if major in (2, 3):
            raw = self.string(major, arg, start)
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self.fail("text string is not valid UTF-8", start) from None
        if major == 4:
            return self.array(arg, depth)
        if major == 5:
            return self.map(arg, depth, start)
        raise self.fail(f"CBOR tag {arg} is not allowed here", start)

    def simple(self, info: int, start: int) -> Any:
        if info == 20:
            return False
        if info == 21:
            return True
        if info == 22:
            return None
        if info == 25:
            return struct.unpack(">e", self.take(2))[0]
        if info == 26:
            return struct.unpack(">f", self.take(4))[0]
        if info == 27:
            return struct.unpack(">d", self.take(8))[0]
        if info == 31:
            raise self.fail("unexpected break", start)
        if self.allow_simple and (info < 20 or info == 23):
            return Simple(info)
        if self.allow_simple and info == 24:
            value = self.take(1)[0]
            if value < 32:
                raise self.fail(f"simple value {value} in a two-byte head", start)
            return Simple(value)
        raise self.fail(f"simple value {info} is not allowed", start)

    def string(self, major: int, arg: int | None, start: int) -> bytes:
        if arg is not None:
            return self.take(arg)
        parts: list[bytes] = []
        while True:
            chunk_start = self.pos
            initial = self.take(1)[0]
            if initial == _BREAK:
                return b"".join(parts)
            if initial >> 5 != major:
                raise self.fail("indefinite-length string chunk of another type", chunk_start)
            length = self.argument(initial & 0x1F, chunk_start)
            if length is None:
                raise self.fail("nested indefinite-length string chunk", chunk_start)
            parts.append(self.take(length))

    def at_break(self) -> bool:
        if self.pos >= len(self.data):
            raise self.fail("missing break of an indefinite-length item")
        if self.data[self.pos] == _BREAK:
            self.pos += 1
            return True
        return False

    def array(self, arg: int | None, depth: int) -> list[Any]:
        items: list[Any] = []
        if arg is None:
            while not self.at_break():
                items.append(self.item(depth + 1))
            return items
        if arg > len(self.data) - self.pos:  # each element takes at least one byte
            raise self.fail(f"array of {arg} elements is longer than the input")
        for _ in range(arg):
            items.append(self.item(depth + 1))
        return items

    def map(self, arg: int | None, depth: int, start: int) -> dict[Any, Any]:
        result: dict[Any, Any] = {}
        if arg is not None and arg > (len(self.data) - self.pos) // 2:
            raise self.fail(f"map of {arg} entries is longer than the input", start)
        count = 0
        while (count < arg) if arg is not None else not self.at_break():
            key_start = self.pos
            key = self.item(depth + 1)
            try:
                duplicate = key in result
            except TypeError:
                raise self.fail("map key is not hashable (array or map)", key_start) from None
            if duplicate:
                raise self.fail(f"duplicate map key {shown(key)}", key_start)
            result[key] = self.item(depth + 1)
            count += 1
        return result


def loads(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH, allow_simple: bool = False) -> Any:
    """Decode exactly one CBOR item from ``data``; raise :class:`StrictCborError`.

    ``allow_simple``: decode ``undefined`` and unassigned simple values as
    :class:`Simple` instead of refusing them (serde_cbor skips them in ignored
    fields). This is also the safe decoder for a state snapshot's body.
    """
    return decode(data, max_depth=max_depth, allow_simple=allow_simple)[0]


def decode(data: bytes, *, max_depth: int = DEFAULT_MAX_DEPTH, allow_simple: bool = False,
           tags: frozenset[int] = frozenset()) -> tuple[Any, int | None, int]:
    """Decode one item spanning ``data``: ``(value, outer tag or None, items decoded)``.

    ``tags``: tag numbers accepted once, around the whole item (COSE_Sign1's
    tag 18); a tag anywhere else is refused like any other.
    """
    reader = _Reader(bytes(data), max_depth, allow_simple)
    tag = None
    if tags and reader.data and reader.data[0] >> 5 == 6:
        initial = reader.take(1)[0]
        tag = reader.argument(initial & 0x1F, 0)
        if tag is None:
            raise reader.fail("indefinite-length tag", 0)
        if tag not in tags:
            raise reader.fail(f"unexpected CBOR tag {tag}", 0)
    value = reader.item(0)
    if reader.pos != len(reader.data):
        raise TrailingBytes(len(reader.data) - reader.pos)
    return value, tag, reader.items
