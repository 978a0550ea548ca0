"""UnixHost on real Unix sockets with a stub event loop, the guest played by GuestTransport."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtio_nsm.vhost_user.device import EVENT_READ
from virtio_nsm.vsock import GuestTransport, VsockBridge
from virtio_nsm.vsock.host import READ_CHUNK, UnixHost

CID = 5


class StubLoop:
    def __init__(self) -> None:
        self.watched: dict[int, Callable[[int], None]] = {}

    def watch(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        self.watched[fd] = callback

    def unwatch(self, fd: int) -> None:
        self.watched.pop(fd, None)

    def serve_queue(self, index: int) -> bool:
        return False


class Rig:
    def __init__(self, path: Path) -> None:
        self.bridge = VsockBridge(CID)
        self.bridge.take_event()
        self.guest = GuestTransport(CID)
        self.loop = StubLoop()
        self.host = UnixHost(self.bridge, path, lambda: None)
        self.host.open(self.loop)
        self.path = path

    def ready(self, sock: socket.socket) -> None:
        """The loop reports the backend's end of ``sock``'s stream readable (or the listener)."""
        for callback in list(self.loop.watched.values()):
            callback(EVENT_READ)

    def connect(self, port: int) -> tuple[socket.socket, socket.socket]:
        """A host program's connection to a guest listener on ``port``: (host end, guest end)."""
        self.guest.listen(port)
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.connect(str(self.path))
        client.sendall(b"CONNECT %d\n" % port)
        self.ready(client)  # accept
        self.ready(client)  # the CONNECT line
        self.exchange()
        assert self.guest.accepted
        guest_end = self.guest.accepted.popleft()
        client.settimeout(5)
        assert client.recv(64).startswith(b"OK ")
        return client, guest_end

    def exchange(self) -> None:
        for _ in range(100):
            moved = False
            while (packet := self.bridge.next_rx(4096 + 44)) is not None:
                self.guest.deliver(packet)
                moved = True
            while (packet := self.guest.next_tx()) is not None:
                self.bridge.guest_packet(packet)
                moved = True
            self.host.pump()
            if not moved:
                return


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path / "v.sock")
    yield r
    r.host.close()


def test_each_read_keeps_its_bytes_although_reads_share_one_buffer(rig: Rig) -> None:
    """Host bytes are read into one reusable buffer; what the bridge holds must be a copy,
    or a second read before the guest takes the first would overwrite it."""
    client, sock = rig.connect(80)
    client.sendall(b"a" * 1000)
    rig.ready(client)
    client.sendall(b"b" * 3000)
    rig.ready(client)
    assert rig.bridge.buffered() == 4000  # both reads held: the guest has not been served
    rig.exchange()
    assert rig.guest.read(sock, 1 << 20) == b"a" * 1000 + b"b" * 3000
    client.close()


def test_a_read_takes_at_most_the_budget_and_the_chunk(rig: Rig) -> None:
    client, sock = rig.connect(81)
    client.setblocking(False)
    data = bytes(range(256)) * (3 * READ_CHUNK // 256)
    sent = 0
    try:
        while sent < len(data):
            sent += client.send(data[sent:])
    except BlockingIOError:
        pass
    got = bytearray()
    for _ in range(10_000):
        before = rig.bridge.buffered()
        rig.ready(client)
        assert rig.bridge.buffered() - before <= READ_CHUNK
        rig.exchange()
        got += rig.guest.read(sock, 1 << 30)
        if len(got) == sent == len(data):
            break
        try:
            while sent < len(data):
                sent += client.send(data[sent:])
        except BlockingIOError:
            pass
    assert bytes(got) == data[:sent] and sent == len(data)
    client.close()


def test_host_data_goes_to_the_guest_before_the_sockets_bookkeeping(rig: Rig) -> None:
    """The rx pass (ending in the guest's interrupt) is the round trip's critical path:
    it runs before the socket's watch is re-examined."""
    client, _ = rig.connect(82)
    order: list[str] = []
    watch = rig.host._watch
    rig.host.guest_work = lambda: order.append("guest")

    def watching(host_id: int) -> None:
        order.append("watch")
        watch(host_id)

    rig.host._watch = watching  # type: ignore[method-assign]
    client.sendall(b"ping")
    listener = rig.host._listener
    assert listener is not None
    [stream] = [cb for fd, cb in rig.loop.watched.items() if fd != listener.fileno()]
    stream(EVENT_READ)
    assert order[0] == "guest" and "watch" in order
    client.close()
