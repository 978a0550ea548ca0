"""Boot measurements of a production enclave, for the device to report.

A Nitro enclave's NSM starts with PCR0-15 locked: PCR0/1/2 (and PCR8 when the
image is signed) measure the image, PCR3 the parent instance's IAM role (zero
without one), PCR4 the parent instance id; the other boot PCRs are zero. An
enclave started in debug mode reports all of them as zeros.
"""

from __future__ import annotations

import datetime as dt
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

from ..errors import ConfigurationError
from ..nsm.device import DeviceState
from ..nsm.pcr import Digest
from .format import EifError
from .measure import PCR_SIZE, pcr_of_instance, pcr_of_role
from .reader import EifImage, read_eif
from .signature import load_certificate

#: PCRs a device measures at boot (and locks).
BOOT_PCRS: Final = 16


def instance_of_module(module_id: str) -> str:
    """The parent instance id in a module id ``i-...-enc...`` (the whole id otherwise)."""
    return module_id.split("-enc", 1)[0]


def module_id_for_instance(instance_id: str) -> str:
    """A fresh module id of an enclave on ``instance_id``: ``<instance>-enc<16 hex>``."""
    return f"{instance_id}-enc{secrets.token_hex(8)}"


def check_image_bootable(image: EifImage, now: dt.datetime | None = None) -> None:
    """Refuse what nitro-cli would not start: a damaged image or a bad signature.

    The CRC must match (QEMU's loader checks it too) and a signed image needs
    a valid signature by a certificate valid now (nitro-cli checks both).
    """
    if not image.crc_ok:
        raise EifError(f"the image's CRC is wrong (header 0x{image.header.crc:08x}, contents "
                       f"0x{image.computed_crc:08x}): the file is damaged")
    check = image.signature_check()
    if check is not None:
        if not check.valid:
            raise EifError(f"the image's signature is not valid: {check.reason}")
        certificate = load_certificate(image.signatures[0].signing_certificate)
        when = now or dt.datetime.now(dt.UTC)
        if not certificate.not_valid_before_utc <= when <= certificate.not_valid_after_utc:
            raise EifError(f"the image's signing certificate is not valid now (valid "
                           f"{certificate.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                           f"{certificate.not_valid_after_utc:%Y-%m-%d %H:%M} UTC)")


def boot_measurements(
    image: EifImage | None,
    *,
    parent_instance_id: str,
    parent_role_arn: str | None = None,
    debug_mode: bool = False,
    pcrs: Mapping[int, bytes] | None = None,
) -> dict[int, bytes]:
    """PCR0-15 at boot for ``NsmDevice(boot_measurements=...)`` (SHA-384 values).

    Without an image PCR0-2 are zero (as the device reports by default).
    ``pcrs`` sets explicit values last, over whatever the image gave.
    """
    zero = bytes(PCR_SIZE)
    values = dict.fromkeys(range(BOOT_PCRS), zero)
    if not debug_mode:
        if image is not None:
            values.update(image.measurements.as_dict())
        if parent_role_arn is not None:
            values[3] = pcr_of_role(parent_role_arn)
        values[4] = pcr_of_instance(parent_instance_id)
    for index, value in (pcrs or {}).items():
        if not 0 <= index < BOOT_PCRS:
            raise ValueError(f"PCR{index}: only PCR0-{BOOT_PCRS - 1} are set at boot")
        if len(value) != PCR_SIZE:
            raise ValueError(f"PCR{index} is {len(value)} bytes, SHA-384 PCRs are {PCR_SIZE}")
        values[index] = bytes(value)
    return values


@dataclass(frozen=True)
class BootConfig:
    """A production enclave's boot configuration, as ``nsm serve --eif ...`` takes it.

    ``resolve()`` reads and checks the image and gives the module id and the
    boot PCRs. A config with nothing set (:meth:`is_default`) means "the
    device's defaults": a random module id and the debug-style PCR layout.
    """

    eif: str | None = None
    parent_instance_id: str | None = None
    parent_role_arn: str | None = None
    debug_mode: bool = False
    pcrs: Mapping[int, bytes] = field(default_factory=dict)
    module_id: str | None = None

    def is_default(self) -> bool:
        return (self.eif is None and self.parent_instance_id is None and self.parent_role_arn is None
                and not self.debug_mode and not self.pcrs and self.module_id is None)

    def sets_measurements(self) -> bool:
        """Whether this config decides the boot PCRs (not only the module id)."""
        return (self.eif is not None or self.parent_instance_id is not None
                or self.parent_role_arn is not None or self.debug_mode or bool(self.pcrs))

    def new_module_id(self) -> str:
        """The module id of a new device: ``--module-id``, else ``<instance>-enc<16 hex>``."""
        if self.module_id is not None:
            return self.module_id
        return module_id_for_instance(self.parent_instance_id or f"i-{secrets.token_hex(9)[:17]}")

    def load_image(self, now: dt.datetime | None = None) -> EifImage | None:
        """Read and check the image (None without ``eif``); EifError/OSError on bad input."""
        if self.eif is None:
            return None
        image = read_eif(os.fspath(self.eif))
        check_image_bootable(image, now)
        return image

    def measurements(self, module_id: str, image: EifImage | None) -> dict[int, bytes]:
        """PCR0-15 of a device with ``module_id`` booted from ``image`` (see :meth:`load_image`).

        PCR4 measures ``parent_instance_id``, else the instance in the module id.
        """
        if self.parent_instance_id is not None and not self.parent_instance_id:
            raise ValueError("the parent instance id is empty")
        return boot_measurements(
            image, parent_instance_id=self.parent_instance_id or instance_of_module(module_id),
            parent_role_arn=self.parent_role_arn, debug_mode=self.debug_mode, pcrs=self.pcrs,
        )

    def resolve(self, now: dt.datetime | None = None) -> tuple[str, dict[int, bytes]]:
        """(module id, boot PCRs) of a new device; EifError/ValueError/OSError on bad input."""
        module_id = self.new_module_id()
        return module_id, self.measurements(module_id, self.load_image(now))

    def differences(self, module_id: str, pcrs: Sequence[bytes], image: EifImage | None) -> list[str]:
        """How an existing device (``module_id``, its PCR values) differs from this config.

        Empty when the device could have been booted from it. A default config
        matches every device; without ``--module-id`` any module id matches.
        """
        problems = []
        if self.module_id is not None and self.module_id != module_id:
            problems.append(f"module id {module_id} (asked for {self.module_id})")
        if self.sets_measurements():
            expected = self.measurements(module_id, image)
            changed = [f"PCR{i}" for i in range(BOOT_PCRS) if i >= len(pcrs) or pcrs[i] != expected[i]]
            if changed:
                problems.append(f"{', '.join(changed)} differ")
        return problems

    def prepare(self, now: dt.datetime | None = None) -> PreparedBoot:
        """Read and check the image once; EifError/ValueError/OSError on bad input."""
        image = self.load_image(now)
        module_id = self.new_module_id()
        return PreparedBoot(self, image, module_id, self.measurements(module_id, image))


@dataclass(frozen=True)
class PreparedBoot:
    """A boot configuration with its image read: the state of a new device, checks of an old one."""

    config: BootConfig
    image: EifImage | None
    module_id: str
    pcrs: dict[int, bytes]

    def initial_state(self) -> DeviceState | None:
        """The boot state of a new device (None: the device's defaults)."""
        if self.config.is_default():
            return None
        return DeviceState.at_boot(self.module_id, Digest.SHA384, self.pcrs)

    def check(self, state: DeviceState, where: str) -> None:
        """Refuse to serve ``state`` (loaded from ``where``) unless this config could have booted it.

        A restart must never re-measure a live device: giving it new boot PCRs
        would be an unlock.
        """
        if state.pcrs.digest is not Digest.SHA384 and self.config.sets_measurements():
            raise ConfigurationError(f"{where} holds a {state.pcrs.digest.value} device; "
                                     "boot measurements are SHA-384")
        problems = self.config.differences(state.module_id, state.pcrs.values, self.image)
        if problems:
            raise ConfigurationError(
                f"{where} holds a device started with a different boot configuration "
                f"({'; '.join(problems)}); a restart never re-measures a device (that would unlock "
                f"its PCRs). To start fresh, remove {where} or use another --state-dir (or --ephemeral)."
            )
