"""CPU latency QoS while requests flow (``nsm serve --cpu-latency-qos``), turnaround statistics.

The request object is exercised on a plain file standing in for ``/dev/cpu_dma_latency``
(every write is recorded), on a pipe that breaks mid-run, and on the real device when
this process may write it (root: CI).  The daemon engages it on answers and releases
it after the linger time; SIGUSR1 statistics report the turnaround.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from click.testing import CliRunner
from vhost_support import serve_in_thread, wait_for

from virtio_nsm.cli import main as cli_main
from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.protocol import DescribePCR, DescribePCRResponse, decode_response, encode_request
from virtio_nsm.vhost_user import cpu_qos
from virtio_nsm.vhost_user.cpu_qos import NO_CONSTRAINT_US, CpuLatencyQos, QosUnavailable
from virtio_nsm.vhost_user.daemon import VhostUserDaemon
from virtio_nsm.vhost_user.histogram import LatencyHistogram

ZERO_PCR = DescribePCRResponse(lock=True, data=bytes(48))  # PCRs 0-15: locked from the start


def written(path: Path) -> list[int]:
    data = path.read_bytes()
    assert len(data) % 4 == 0
    return [v for (v,) in struct.iter_unpack("=i", data)]


@pytest.fixture
def fake_device(tmp_path: Path) -> Path:
    path = tmp_path / "cpu_dma_latency"
    path.touch(mode=0o600)
    return path


# -- the request object ------------------------------------------------------------------


def test_engage_writes_zero_once_and_release_restores_no_constraint(fake_device: Path) -> None:
    qos = CpuLatencyQos.open(str(fake_device), linger_ms=100)
    try:
        assert written(fake_device) == [NO_CONSTRAINT_US] and not qos.engaged
        assert qos.timeout(0) is None
        qos.engage(1_000)
        qos.engage(2_000_000)  # already engaged: only the deadline moves
        assert written(fake_device) == [NO_CONSTRAINT_US, 0] and qos.engaged
        assert qos.release_at == 102_000_000
        assert qos.timeout(52_000_000) == pytest.approx(0.05)
        assert qos.timeout(500_000_000) == 0.0
        qos.expire(102_000_000 - 1)
        assert qos.engaged
        qos.expire(102_000_000)
        assert not qos.engaged
        assert written(fake_device) == [NO_CONSTRAINT_US, 0, NO_CONSTRAINT_US]
        qos.expire(10**12)  # nothing to do
        qos.engage(10**12)
        assert written(fake_device)[-1] == 0 and qos.engagements == 2
    finally:
        qos.close()
    with pytest.raises(QosUnavailable, match="closed"):
        qos.engage(0)
    qos.close()  # twice is harmless


def test_open_failures_say_why(tmp_path: Path) -> None:
    with pytest.raises(QosUnavailable, match=r"cannot open .*missing"):
        CpuLatencyQos.open(str(tmp_path / "missing"))
    if os.geteuid() != 0:  # root may write anything
        locked = tmp_path / "locked"
        locked.touch(mode=0o400)
        with pytest.raises(QosUnavailable, match="needs root or write access"):
            CpuLatencyQos.open(str(locked))
    fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
    try:
        with pytest.raises(ValueError):
            CpuLatencyQos(fd, linger_ms=-1)  # refused: the fd stays the caller's
    finally:
        os.close(fd)


def test_a_write_that_fails_is_reported(tmp_path: Path) -> None:
    r, w = os.pipe()
    qos = CpuLatencyQos(w)  # the first write (no constraint) reaches the pipe
    os.close(r)
    with pytest.raises(QosUnavailable, match="cannot write"):
        qos.engage(0)
    qos.close()


def _current_latency_us() -> int:
    fd = os.open(cpu_qos.DEVICE, os.O_RDONLY)
    try:
        return int(struct.unpack("=i", os.read(fd, 4))[0])
    finally:
        os.close(fd)


@pytest.mark.skipif(not os.access(cpu_qos.DEVICE, os.W_OK), reason=f"{cpu_qos.DEVICE} not writable here")
def test_the_real_device_follows_engage_and_release() -> None:
    if _current_latency_us() == 0:
        pytest.skip("another process already holds a 0 us request")
    qos = CpuLatencyQos.open()
    try:
        qos.engage(time.monotonic_ns())
        assert _current_latency_us() == 0
        qos.release()
        assert _current_latency_us() > 0
        qos.engage(time.monotonic_ns())
    finally:
        qos.close()  # closing withdraws the request even while engaged
    assert _current_latency_us() > 0


# -- the histogram -------------------------------------------------------------------------


def test_histogram_percentiles_and_overflow() -> None:
    h = LatencyHistogram(limit_us=100)
    with pytest.raises(ValueError, match="no samples"):
        h.percentile(0.5)
    for us in range(1, 11):  # 1..10 us
        h.add(us * 1000 + 999)  # sub-microsecond parts fall in the same bucket
    assert h.count == 10
    assert (h.percentile(0.1), h.percentile(0.5), h.percentile(0.9), h.percentile(1.0)) == (1, 5, 9, 10)
    assert h.percentile(0.0) == 1
    h.add(5_000_000)  # 5 ms: beyond the limit, counted as "at least 100 us"
    assert h.percentile(1.0) == 100
    with pytest.raises(ValueError):
        h.add(-1)
    with pytest.raises(ValueError):
        h.percentile(1.5)
    h.reset()
    assert h.count == 0
    with pytest.raises(ValueError):
        LatencyHistogram(limit_us=0)


# -- the daemon ----------------------------------------------------------------------------


@contextmanager
def serving(tmp_path: Path, qos: CpuLatencyQos | None) -> Iterator[VhostUserDaemon]:
    with serve_in_thread(tmp_path / "nsm.sock", message_timeout=5.0, cpu_qos=qos) as run:
        yield run.daemon


def test_daemon_holds_the_request_while_answering_and_releases_it_when_idle(
    tmp_path: Path, fake_device: Path
) -> None:
    qos = CpuLatencyQos.open(str(fake_device), linger_ms=50)
    with serving(tmp_path, qos) as daemon, NsmFrontend(daemon.path, timeout=20) as f:
        assert not qos.engaged  # connected, nothing asked: nothing held
        for _ in range(3):
            assert decode_response(f.exchange(encode_request(DescribePCR(0)))) == ZERO_PCR
        # (engaged just after the answer is published: the frontend may see it first)
        wait_for(lambda: qos.engagements == 1, "an engagement")
        wait_for(lambda: not qos.engaged, "the linger time to pass")
        assert written(fake_device)[-1] == NO_CONSTRAINT_US and 0 in written(fake_device)
        engagements = qos.engagements
        f.exchange(encode_request(DescribePCR(1)))  # traffic again: engaged again
        wait_for(lambda: qos.engagements == engagements + 1, "a new engagement")
        wait_for(lambda: not qos.engaged, "the release")
    with pytest.raises(QosUnavailable, match="closed"):  # the daemon closed it
        qos.engage(0)


def test_a_qos_device_that_breaks_does_not_stop_the_service(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    r, w = os.pipe()
    qos = CpuLatencyQos(w)
    os.close(r)
    with caplog.at_level(logging.ERROR, "virtio_nsm.vhost_user"), serving(tmp_path, qos) as daemon, \
            NsmFrontend(daemon.path, timeout=20) as f:
        for index in range(3):
            assert decode_response(f.exchange(encode_request(DescribePCR(index)))) == ZERO_PCR
        assert daemon.cpu_qos is None
    assert "CPU latency QoS given up" in caplog.text


def test_stats_report_turnaround_since_the_last_request(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, "virtio_nsm.vhost_user"), serving(tmp_path, None) as daemon, \
            NsmFrontend(daemon.path, timeout=20) as f:
        for _ in range(20):
            f.exchange(encode_request(DescribePCR(0)))
        daemon.request_stats()  # logged after the pass that answered the last request
        wait_for(lambda: " stats: " in caplog.text, "the statistics line")
        line = next(r.getMessage() for r in caplog.records if "stats: " in r.getMessage())
        m = re.search(r"(\d+) kick wake-ups.* (\d+) interrupts.*turnaround p10 \d+ / p50 \d+ / "
                      r"p90 \d+ us over (\d+)", line)
        assert m is not None, line
        kicks, interrupts, samples = map(int, m.groups())
        assert kicks == 20  # not polling: every request came with a kick
        # A sample for each request that followed an interrupt (the driver asks for
        # some, not all, with EVENT_IDX): every interrupt but perhaps the last one.
        assert 1 <= interrupts <= 20 and interrupts - 1 <= samples <= min(interrupts, 19)
        assert daemon.turnaround.count == 0  # each report covers what happened since the last
        caplog.clear()
        daemon.request_stats()
        wait_for(lambda: " stats: " in caplog.text, "the second statistics line")
        assert "0 kick wake-ups" in caplog.text and "turnaround no samples" in caplog.text


# -- the CLI -------------------------------------------------------------------------------


def test_serve_refuses_cpu_latency_qos_it_cannot_have(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_qos, "DEVICE", str(tmp_path / "no-such-device"))
    result = CliRunner().invoke(
        cli_main, ["serve", "--ephemeral", "--cpu-latency-qos", "--vhost-user", str(tmp_path / "s")]
    )
    assert result.exit_code == 2
    assert "--cpu-latency-qos: cannot open" in result.output
    assert not (tmp_path / "s").exists()  # refused before listening


@pytest.mark.skipif(not os.access(cpu_qos.DEVICE, os.W_OK), reason=f"{cpu_qos.DEVICE} not writable here")
def test_serve_with_cpu_latency_qos_and_sigusr1_stats(tmp_path: Path) -> None:
    path = tmp_path / "nsm.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "virtio_nsm", "serve", "--ephemeral", "--cpu-latency-qos",
         "--vhost-user", str(path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        lines: list[str] = []
        while len(lines) < 8 and not any(ln.startswith("CPU latency QoS") for ln in lines):
            lines.append(proc.stdout.readline())  # the banner (its root lines vary)
        assert any(ln.startswith("CPU latency QoS: idle CPUs kept responsive") for ln in lines), lines
        # A driver that sleeps on every answer: each one is an interrupt and a turnaround.
        with NsmFrontend(path, timeout=20, poll_us=0) as f:
            for _ in range(5):
                f.exchange(encode_request(DescribePCR(0)))
        proc.send_signal(signal.SIGUSR1)
        time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "5 interrupts, 1 QoS engagements; turnaround p10" in err and "us over 4" in err, err
