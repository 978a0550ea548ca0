"""PollPolicy: the trials that decide whether polling pays, and the back-off (pure logic)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.nsm.frontend import NsmFrontend
from virtio_nsm.nsm.protocol import ExtendPCR, decode_response, encode_request
from virtio_nsm.nsm.virtio import NsmVirtioDevice
from virtio_nsm.vhost_user.daemon import VhostUserDaemon
from virtio_nsm.vhost_user.polling import PollPolicy

US = 1000


def feed(policy: PollPolicy, gap: dict[bool, int], count: int, t: list[int]) -> list[bool]:
    """``count`` answers of 5 us, each ``gap[mode]`` after the previous; the modes seen."""
    modes = []
    for _ in range(count):
        modes.append(policy.allowed)
        t[0] += gap[policy.allowed]
        policy.answered(t[0], t[0] + 5 * US)
        t[0] += 5 * US
    return modes


def new(**kw: int) -> tuple[PollPolicy, list[int]]:
    policy = PollPolicy(200, block=2, rounds=2, exploit=10, **kw)  # type: ignore[arg-type]
    clock = [1_000_000]
    policy.answered(clock[0], clock[0])  # the first answer gives no period
    return policy, clock


def test_a_trial_alternates_blocks_then_keeps_the_faster_mode() -> None:
    policy, t = new()
    modes = feed(policy, {True: 20 * US, False: 50 * US}, 8, t)
    assert modes == [True, True, False, False, True, True, False, False]
    assert policy.trials == 1 and policy.polling_won == 1 and policy.allowed
    assert policy.last_medians == {True: 25 * US, False: 55 * US}  # periods
    # Decided: polling for `exploit` answers, then a new trial starts with polling.
    assert feed(policy, {True: 20 * US, False: 50 * US}, 10, t) == [True] * 10
    assert policy.allowed


def test_polling_that_does_not_help_is_dropped() -> None:
    policy, t = new()
    feed(policy, {True: 80 * US, False: 50 * US}, 8, t)
    assert policy.trials == 1 and policy.polling_won == 0 and not policy.allowed
    assert not policy.may_poll(t[0])
    # ... until the next trial, which gives polling another chance.
    modes = feed(policy, {True: 20 * US, False: 50 * US}, 10 + 8, t)
    assert modes[:10] == [False] * 10 and modes[10] is True
    assert policy.trials == 2 and policy.allowed


def test_a_tie_goes_to_not_polling() -> None:
    policy, t = new()
    feed(policy, {True: 48 * US, False: 50 * US}, 8, t)  # within the 10 % margin
    assert not policy.allowed


def test_answers_far_apart_are_not_samples() -> None:
    policy, t = new()
    feed(policy, {True: 30_000 * US, False: 30_000 * US}, 20, t)  # 30 ms: not a stream
    assert policy.trials == 0 and policy.allowed  # still in the first block


def test_back_off_doubles_and_is_forgotten_after_a_quiet_window() -> None:
    policy = PollPolicy(100, adaptive=False)
    assert policy.may_poll(0)
    policy.preempted(0)
    assert not policy.may_poll(999_999) and policy.may_poll(1_000_000)
    policy.preempted(1_000_000)
    assert not policy.may_poll(2_999_999) and policy.may_poll(3_000_000)
    policy.undisturbed()
    policy.preempted(3_000_000)
    assert policy.may_poll(4_000_000) and policy.backoffs == 3


def test_zero_window_never_polls_and_fixed_policy_always_does() -> None:
    off = PollPolicy(0)
    assert not off.may_poll(10**12)
    fixed = PollPolicy(100, adaptive=False)
    clock = [0]
    assert feed(fixed, {True: 90 * US, False: 10 * US}, 50, clock) == [True] * 50
    with pytest.raises(ValueError):
        PollPolicy(-1)


def test_daemon_switches_modes_without_losing_a_request(tmp_path: Path) -> None:
    import threading

    device = NsmDevice()
    daemon = VhostUserDaemon(tmp_path / "nsm.sock", NsmVirtioDevice(device.handle), poll_us=600_000_000)
    sys.setswitchinterval(0.0002)  # the daemon spins in a thread of this process
    # Small blocks, no stream limit: several trials within the test, whatever the timing.
    daemon.policy = PollPolicy(600_000_000, block=3, rounds=2, exploit=5,
                               stream_gap_ns=10**15)
    daemon.bind()
    thread = threading.Thread(target=daemon.serve_forever, daemon=True)
    thread.start()
    try:
        with NsmFrontend(daemon.path, timeout=20) as f:
            values = [decode_response(f.exchange(encode_request(ExtendPCR(17, b"y"))))
                      for _ in range(60)]
        assert len({v.data for v in values}) == 60  # type: ignore[union-attr]
        assert daemon.policy.trials >= 2
    finally:
        sys.setswitchinterval(0.005)
        daemon.stop()
        thread.join(20)
        daemon.close()
    assert not thread.is_alive()
