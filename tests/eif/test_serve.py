"""``nsm serve --eif ...``: a served device with a production enclave's boot PCRs."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from virtio_nsm import persist
from virtio_nsm.cli import main
from virtio_nsm.eif import BootConfig
from virtio_nsm.errors import ConfigurationError
from virtio_nsm.serving import ServeConfig, serving

from .test_vectors import FACTS_PCR0, INSTANCE_PCR4, ROLE_PCR3

INSTANCE = "i-1234567890abcdef0"
ROLE = "arn:aws:iam::123456789012:role/Webserver"


@pytest.fixture
def image(tmp_path: Path, make_image) -> Path:
    path = tmp_path / "app.eif"
    path.write_bytes(make_image())
    return path


def _config(tmp_path: Path, boot: BootConfig, **kwargs) -> ServeConfig:
    return ServeConfig.validate(socket_path=tmp_path / "nsm.sock", boot=boot, **kwargs)


def test_served_state_dir_has_the_production_layout_and_keeps_it(tmp_path, image) -> None:
    state = tmp_path / "state"
    boot = BootConfig(eif=str(image), parent_instance_id=INSTANCE, parent_role_arn=ROLE)
    with serving(_config(tmp_path, boot, state_dir=state)) as served:
        assert served.nsm is not None
        device_state = served.nsm.device.state
    assert device_state.module_id.startswith(INSTANCE + "-enc")
    values = device_state.pcrs.values
    assert values[0].hex() == FACTS_PCR0 and values[3].hex() == ROLE_PCR3
    assert values[4].hex() == INSTANCE_PCR4 and device_state.pcrs.locked == 0xFFFF
    # a restart with the same options (or none) carries on with the same device
    for again in (boot, BootConfig(eif=str(image), parent_role_arn=ROLE), BootConfig()):
        with serving(_config(tmp_path, again, state_dir=state)) as served:
            assert served.nsm is not None and served.nsm.device.state.module_id == device_state.module_id
    # another configuration is refused, and says how to start fresh
    for other in (BootConfig(eif=str(image), parent_instance_id=INSTANCE),  # no role: PCR3 differs
                  BootConfig(debug_mode=True),
                  BootConfig(module_id="i-0-enc0")):
        with pytest.raises(persist.StateError) as info, serving(_config(tmp_path, other, state_dir=state)):
            pass
        message = str(info.value)
        assert "different boot configuration" in message and f"remove {state}" in message
    assert not (tmp_path / "nsm.sock").exists()


def test_ephemeral_with_eif(tmp_path, image) -> None:
    boot = BootConfig(eif=str(image), debug_mode=True, module_id="i-0123-enc00")
    with serving(_config(tmp_path, boot, ephemeral=True)) as served:
        assert served.nsm is not None
        assert served.nsm.device.state.module_id == "i-0123-enc00"
        assert served.nsm.device.state.pcrs.values[:16] == (bytes(48),) * 16


def test_bad_image_is_a_configuration_error_before_anything_exists(tmp_path) -> None:
    bad = tmp_path / "bad.eif"
    bad.write_bytes(b"nope")
    state = tmp_path / "state"
    with pytest.raises(ConfigurationError, match="truncated"):
        _config(tmp_path, BootConfig(eif=str(bad)), state_dir=state)
    assert not state.exists()
    result = CliRunner().invoke(main, ["serve", "--vhost-user", str(tmp_path / "s.sock"), "--state-dir",
                                       str(state), "--eif", str(bad)])
    assert result.exit_code == 2 and "bad.eif: truncated" in result.stderr
    assert not state.exists()


def test_serve_cli_refuses_another_boot_configuration(tmp_path, image) -> None:
    state = tmp_path / "state"
    boot = BootConfig(eif=str(image), parent_instance_id=INSTANCE)
    with serving(_config(tmp_path, boot, state_dir=state)):
        pass
    result = CliRunner().invoke(main, ["serve", "--vhost-user", str(tmp_path / "s.sock"), "--state-dir",
                                       str(state), "--eif", str(image), "--pcr", f"5={'aa' * 48}"])
    assert result.exit_code == 1
    assert "different boot configuration (PCR5 differ)" in result.stderr
    assert "--state-dir" in result.stderr


def test_vm_run_rejects_boot_options_for_other_devices(image) -> None:
    result = CliRunner().invoke(main, ["vm", "run", "--device", "none", "--eif", str(image), "--", "true"])
    assert result.exit_code == 2 and "--device ours" in result.output
