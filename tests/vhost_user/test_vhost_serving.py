"""One validated serve configuration, one builder, one writer of QEMU options."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest
from click.testing import CliRunner
from vhost_support import TwoQueueDevice

from virtio_nsm import persist
from virtio_nsm.cli import main as cli_main
from virtio_nsm.errors import ConfigurationError
from virtio_nsm.nsm.frontend import VhostUserTransport
from virtio_nsm.nsm.protocol import DescribePCR, encode_request
from virtio_nsm.serving import ServeConfig, qemu_options, serving
from virtio_nsm.vhost_user import qemu


def test_missing_socket_directory_is_created_0700_before_anything_else(tmp_path: Path) -> None:
    # issue 18: --state-dir A --vhost-user B/x.sock with B missing
    state, sock = tmp_path / "A", tmp_path / "B" / "deeper" / "x.sock"
    config = ServeConfig.validate(socket_path=sock, state_dir=state)
    assert not state.exists() and not sock.parent.exists()  # validating creates nothing
    with serving(config) as served:
        for directory in (tmp_path / "B", sock.parent):
            assert stat.S_IMODE(directory.stat().st_mode) == 0o700
        assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o600
        assert served.nsm is not None and served.nsm.store is not None
        assert (state / persist.STATE_FILE).exists()
    assert not sock.exists()


@pytest.mark.parametrize("problem", ["parent-is-a-file", "not-a-socket", "in-use", "too-long"])
def test_a_socket_that_cannot_be_made_fails_before_any_side_effect(tmp_path: Path, problem: str) -> None:
    state = tmp_path / "A"
    (tmp_path / "file").write_text("x")
    sock = {"parent-is-a-file": tmp_path / "file" / "B" / "x.sock",
            "not-a-socket": tmp_path / "file",
            "in-use": tmp_path / "busy.sock",
            "too-long": tmp_path / ("d" * 120) / "x.sock"}[problem]
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        if problem == "in-use":
            listener.bind(str(sock))
            listener.listen(1)
        result = CliRunner().invoke(cli_main, ["serve", "--state-dir", str(state), "--vhost-user", str(sock)])
    finally:
        listener.close()
    assert result.exit_code == 2, result.output
    message = result.output.strip()
    assert message.startswith("nsm: ") and "\n" not in message and "Traceback" not in message
    assert {"parent-is-a-file": "is not a directory", "not-a-socket": "is not a socket",
            "in-use": "in use", "too-long": "AF_UNIX"}[problem] in message
    assert not state.exists()  # no state directory, CA key or state file was made


@pytest.mark.parametrize(
    ("options", "match"),
    [({"ephemeral": True, "state_dir": Path("x")}, "exclude each other"),
     ({"poll_us": -1}, ">= 0"),
     ({"state_dir": "FILE"}, "not a directory"),
     ({"ca_dir": "MISSING"}, "MISSING"),
     ({"cpu_qos_device": "MISSING"}, "cannot open"),
     ({"message_timeout": 0}, "> 0")],
)
def test_validation_errors(tmp_path: Path, options: dict[str, object], match: str) -> None:
    (tmp_path / "FILE").write_text("x")
    resolved = {k: tmp_path / v if v in ("FILE", "MISSING") else v for k, v in options.items()}
    if "cpu_qos_device" in resolved:
        resolved["cpu_qos_device"] = str(resolved["cpu_qos_device"])
    with pytest.raises(ConfigurationError, match=match):
        ServeConfig.validate(socket_path=tmp_path / "s.sock", **resolved)  # type: ignore[arg-type]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["FILE"]


def test_a_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    state, sock = tmp_path / "A", tmp_path / "B" / "x.sock"
    with persist.StateStore.open(state):  # another backend holds the state directory
        config = ServeConfig.validate(socket_path=sock, state_dir=state)
        with pytest.raises(persist.StateError, match="in use"), serving(config):
            pass
    assert not (tmp_path / "B").exists()  # the directory made for the socket is gone again


def test_the_builder_serves_any_device_and_the_nsm(tmp_path: Path) -> None:
    device = TwoQueueDevice()
    with serving(ServeConfig(tmp_path / "d.sock", ephemeral=True), device) as served:
        assert served.nsm is None and served.daemon.device is device
        assert "vhost-user-test-device-pci,chardev=nsm0,virtio-id=126,num_vqs=2" in qemu_options(served)
    with serving(ServeConfig(None, ephemeral=True)) as served:  # a private temporary socket
        assert stat.S_IMODE(served.socket_path.parent.stat().st_mode) == 0o700
        import threading

        thread = threading.Thread(target=served.daemon.serve_forever, daemon=True)
        thread.start()
        try:
            with VhostUserTransport(served.socket_path, timeout=10) as t:
                assert t.exchange(encode_request(DescribePCR(0)))
        finally:
            served.daemon.stop()
            thread.join(10)
        directory = served.socket_path.parent
    assert not directory.exists()


def test_qemu_options_pci_and_mmio() -> None:
    nsm = qemu.for_device(33, 1)
    assert qemu.device_args(nsm, "/run/a,b.sock") == [
        "-chardev", "socket,id=nsm0,path=/run/a,,b.sock",
        "-device", "vhost-user-test-device-pci,chardev=nsm0,virtio-id=33,num_vqs=1"]
    assert qemu.device_args(nsm, "/s", chardev="c1", transport="mmio")[3] == \
        "vhost-user-test-device,chardev=c1,virtio-id=33,num_vqs=1"
    vsock = qemu.for_device(qemu.VIRTIO_ID_VSOCK, 3)
    assert qemu.device_args(vsock, "/v.sock")[3] == "vhost-user-vsock-pci,chardev=nsm0"
    assert qemu.device_args(vsock, "/v.sock", transport="mmio")[3] == "vhost-user-vsock-device,chardev=nsm0"
    assert qemu.memory_args("512M") == ["-object", "memory-backend-memfd,id=mem,size=512M,share=on",
                                        "-machine", "memory-backend=mem"]


def test_vm_run_does_not_import_the_command_line() -> None:
    import subprocess
    import sys

    code = ("import sys, virtio_nsm.vm.run as r; assert r.backend_available(); "
            "print(sorted(m for m in sys.modules if m.split('.')[:2] == ['virtio_nsm', 'cli']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=dict(os.environ, NSM_VM_BACKEND_CMD=""))
    assert out.stdout.strip() == "[]"
