"""Boot measurements from an image and its parent, as the device reports them."""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from virtio_nsm import NsmDevice
from virtio_nsm.eif import BootConfig, EifError, boot_measurements, read_eif
from virtio_nsm.eif.boot import instance_of_module
from virtio_nsm.nsm import protocol as p

from .test_vectors import FACTS_PCR0, FACTS_PCR1, FACTS_PCR2, INSTANCE_PCR4, ROLE_PCR3

ROLE = "arn:aws:iam::123456789012:role/Webserver"
INSTANCE = "i-1234567890abcdef0"


def _describe(device: NsmDevice, index: int) -> p.DescribePCRResponse:
    answer = p.decode_response(device.handle(p.encode_request(p.DescribePCR(index))))
    assert isinstance(answer, p.DescribePCRResponse)
    return answer


@pytest.fixture
def image_path(tmp_path, make_image):
    path = tmp_path / "facts.eif"
    path.write_bytes(make_image())
    return path


def test_production_layout(image_path) -> None:
    module_id, values = BootConfig(eif=str(image_path), parent_instance_id=INSTANCE,
                                   parent_role_arn=ROLE).resolve()
    assert module_id.startswith(INSTANCE + "-enc") and len(module_id) == len(INSTANCE) + 4 + 16
    device = NsmDevice(module_id=module_id, boot_measurements=values)
    expected = {0: FACTS_PCR0, 1: FACTS_PCR1, 2: FACTS_PCR2, 3: ROLE_PCR3, 4: INSTANCE_PCR4}
    for index in range(32):
        answer = _describe(device, index)
        assert answer.lock == (index < 16)
        assert answer.data.hex() == expected.get(index, "00" * 48), index


def test_without_role_pcr3_is_zero_and_module_id_gives_the_instance(image_path) -> None:
    module_id, values = BootConfig(eif=str(image_path), module_id=f"{INSTANCE}-enc0123456789abcdef"
                                   ).resolve()
    assert module_id == f"{INSTANCE}-enc0123456789abcdef"
    assert values[3] == bytes(48) and values[4].hex() == INSTANCE_PCR4
    assert instance_of_module(module_id) == INSTANCE


def test_debug_mode_zeroes_every_boot_pcr(image_path) -> None:
    _, values = BootConfig(eif=str(image_path), parent_instance_id=INSTANCE, parent_role_arn=ROLE,
                           debug_mode=True).resolve()
    assert values == dict.fromkeys(range(16), bytes(48))


def test_explicit_pcrs_win(image_path) -> None:
    _, values = BootConfig(eif=str(image_path), parent_instance_id=INSTANCE,
                           pcrs={0: b"\x01" * 48, 15: b"\x0f" * 48}).resolve()
    assert values[0] == b"\x01" * 48 and values[15] == b"\x0f" * 48 and values[1].hex() == FACTS_PCR1
    with pytest.raises(ValueError, match="PCR16"):
        boot_measurements(None, parent_instance_id=INSTANCE, pcrs={16: bytes(48)})
    with pytest.raises(ValueError, match="47 bytes"):
        boot_measurements(None, parent_instance_id=INSTANCE, pcrs={1: bytes(47)})


def test_signed_image_sets_pcr8(tmp_path, make_image, signer) -> None:
    path = tmp_path / "signed.eif"
    path.write_bytes(make_image(signer=signer))
    _, values = BootConfig(eif=str(path), parent_instance_id=INSTANCE).resolve()
    assert values[8] == read_eif(path).measurements.pcr8


def test_damaged_or_badly_signed_images_do_not_boot(tmp_path, make_image, signer, make_cert) -> None:
    damaged = bytearray(make_image())
    damaged[-1] ^= 1
    path = tmp_path / "damaged.eif"
    path.write_bytes(bytes(damaged))
    with pytest.raises(EifError, match="CRC is wrong"):
        BootConfig(eif=str(path)).resolve()
    from virtio_nsm.eif import Signer
    expired = Signer.from_pem(*make_cert(ec.SECP384R1(), days=1,
                                         not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC)))
    path.write_bytes(make_image(signer=expired))
    with pytest.raises(EifError, match="not valid now"):
        BootConfig(eif=str(path)).resolve()
    assert BootConfig(eif=str(path)).resolve(now=dt.datetime(2020, 1, 1, 12, tzinfo=dt.UTC))


def test_default_config() -> None:
    assert BootConfig().is_default() and not BootConfig().sets_measurements()
    assert not BootConfig(module_id="i-1-enc2").sets_measurements()
    assert BootConfig(debug_mode=True).sets_measurements()


def test_differences_of_an_existing_device(image_path) -> None:
    config = BootConfig(eif=str(image_path), parent_instance_id=INSTANCE)
    module_id, values = config.resolve()
    device = NsmDevice(module_id=module_id, boot_measurements=values)
    pcrs = device.state.pcrs.values
    image = config.load_image()
    assert config.differences(module_id, pcrs, image) == []
    # restarting without --parent-instance-id: PCR4 comes from the stored module id
    assert BootConfig(eif=str(image_path)).differences(module_id, pcrs, image) == []
    assert BootConfig().differences(module_id, pcrs, None) == []  # defaults accept any device
    assert BootConfig(eif=str(image_path), debug_mode=True).differences(module_id, pcrs, image) == [
        "PCR0, PCR1, PCR2, PCR4 differ"]
    assert BootConfig(eif=str(image_path), parent_role_arn=ROLE).differences(module_id, pcrs, image) == [
        "PCR3 differ"]
    assert BootConfig(module_id="i-0-enc1").differences(module_id, pcrs, None) == [
        f"module id {module_id} (asked for i-0-enc1)"]
    # a device started with the defaults (no image): an --eif restart is refused
    plain = NsmDevice(module_id=module_id)
    assert config.differences(module_id, plain.state.pcrs.values, image) == ["PCR0, PCR1, PCR2 differ"]


def test_prepared_boot_initial_state_and_restart_check(image_path) -> None:
    from virtio_nsm import ConfigurationError

    prepared = BootConfig(eif=str(image_path), parent_instance_id=INSTANCE).prepare()
    state = prepared.initial_state()
    assert state is not None and state.module_id == prepared.module_id
    assert state.pcrs.values[0].hex() == FACTS_PCR0 and state.pcrs.locked == 0xFFFF
    prepared.check(state, "/state")  # the same config: accepted
    BootConfig().prepare().check(state, "/state")  # no boot options: whatever the state holds
    assert BootConfig().prepare().initial_state() is None
    other = BootConfig(eif=str(image_path), parent_instance_id="i-00000000000000000").prepare()
    with pytest.raises(ConfigurationError) as info:
        other.check(state, "/state")
    message = str(info.value)
    assert "different boot configuration" in message and "PCR4 differ" in message
    assert "remove /state or use another --state-dir" in message
