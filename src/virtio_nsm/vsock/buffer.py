"""A FIFO of bytes kept as the chunks it was fed with (no copying on append or consume)."""

from __future__ import annotations

from collections import deque

__all__ = ["ByteQueue"]


class ByteQueue:
    """Bytes in arrival order; ``take`` and ``consume`` work from the front."""

    __slots__ = ("_chunks", "_len", "_offset")

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self._offset = 0  # bytes of _chunks[0] already consumed
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def __bool__(self) -> bool:
        return self._len > 0

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(bytes(data))
            self._len += len(data)

    def front(self) -> memoryview:
        """The first contiguous piece (empty if the queue is)."""
        if not self._chunks:
            return memoryview(b"")
        return memoryview(self._chunks[0])[self._offset :]

    def consume(self, n: int) -> None:
        """Drop ``n`` bytes from the front (``0 <= n <= len(self)``)."""
        if not 0 <= n <= self._len:
            raise ValueError(f"cannot consume {n} of {self._len} bytes")
        self._len -= n
        while n:
            first = self._chunks[0]
            left = len(first) - self._offset
            if n < left:
                self._offset += n
                return
            n -= left
            self._chunks.popleft()
            self._offset = 0

    def take(self, n: int) -> bytes:
        """Remove and return up to ``n`` bytes from the front."""
        n = min(n, self._len)
        first = self._chunks[0] if self._chunks else b""
        if n <= len(first) - self._offset:
            out = first[self._offset : self._offset + n]
            self.consume(n)
            return out
        parts: list[bytes] = []
        left = n
        while left:
            view = self.front()
            piece = bytes(view[:left])
            parts.append(piece)
            self.consume(len(piece))
            left -= len(piece)
        return b"".join(parts)

    def clear(self) -> None:
        self._chunks.clear()
        self._offset = 0
        self._len = 0
