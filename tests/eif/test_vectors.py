"""The facts sheet's vectors and AWS's published encodings, checked independently."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

from virtio_nsm.eif import pcr_of_instance, pcr_of_role, read_stream
from virtio_nsm.eif.signature import PcrSignature, encode_signature_section, pcr_info_payload

ZERO = bytes(48)

FACTS_PCR0 = "f963f39c7d27f17afbe229d0e981b21599e4f5156c566ae8fa9e2d8bf1a9f480abae0f977cd4993c0bd447810a9e5ea4"
FACTS_PCR1 = "5484cc4e2e40e749928f4cfb25d0dd642e40babc689e57a4ef89cf8e2342c1da59b858cf7b828945773a8cacaf22fe9b"
FACTS_PCR2 = "c3c20bf6bf31a7dce4ba1aa496ab51e33a66cbd49e0d51a19832b80d6f3ee317138f8642296d02626ccfefa38ce64284"
ONE_RAMDISK_PCR2 = "21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c10edb30948c90ba67310f7b964fc500a"
ROLE_PCR3 = "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef4fc1f1a452e315b9e98f9e312e6921e6"
INSTANCE_PCR4 = "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812719327281c401a67a10fcba87ae79ce0"


def test_facts_image_measurements_size_and_crc(make_image) -> None:
    data = make_image()
    assert len(data) == 645
    assert struct.unpack(">I", data[544:548])[0] == 0xC1BC481C
    # the CRC is zlib's over the whole file but the CRC field
    assert zlib.crc32(data[:544] + data[548:]) == 0xC1BC481C
    image = read_stream(io.BytesIO(data))
    assert image.crc_ok
    assert image.measurements.pcr0.hex() == FACTS_PCR0
    assert image.measurements.pcr1.hex() == FACTS_PCR1
    assert image.measurements.pcr2.hex() == FACTS_PCR2
    assert image.measurements.pcr8 is None


def test_facts_formulas_by_hand() -> None:
    def h(b: bytes) -> bytes:
        return hashlib.sha384(b).digest()

    def extend(b: bytes) -> bytes:
        return h(ZERO + b)

    assert extend(h(b"KERNEL" b"console=ttyS0" b"RAMDISK1" b"RAMDISK2")).hex() == FACTS_PCR0
    assert extend(h(b"KERNEL" b"console=ttyS0" b"RAMDISK1")).hex() == FACTS_PCR1
    assert extend(h(b"RAMDISK2")).hex() == FACTS_PCR2


def test_pcr2_of_an_image_with_one_ramdisk(make_image) -> None:
    image = read_stream(io.BytesIO(make_image(ramdisks=(b"only ramdisk",))))
    assert image.measurements.pcr2.hex() == ONE_RAMDISK_PCR2


def test_pcr3_of_a_role_arn() -> None:
    assert pcr_of_role("arn:aws:iam::123456789012:role/Webserver").hex() == ROLE_PCR3


def test_pcr4_of_an_instance_id() -> None:
    assert pcr_of_instance("i-1234567890abcdef0").hex() == INSTANCE_PCR4


def test_builder_section_order_and_header(make_image) -> None:
    data = make_image()
    magic, version, flags, mem, cpus, reserved, count = struct.unpack_from(">4sHHQQHH", data)
    assert (magic, version, flags, mem, cpus, reserved, count) == (b".eif", 4, 0, 1 << 30, 2, 0, 5)
    offsets = struct.unpack_from(">32Q", data, 28)
    sizes = struct.unpack_from(">32Q", data, 284)
    types = [struct.unpack_from(">HHQ", data, offsets[i]) for i in range(5)]
    # kernel, cmdline (no NUL), metadata, ramdisk, ramdisk
    assert [t for t, _, _ in types] == [1, 2, 5, 3, 3]
    assert [s for _, _, s in types] == list(sizes[:5]) == [6, 13, 2, 8, 8]
    assert offsets[:5] == (548, 566, 591, 605, 625)
    assert offsets[5:] == (0,) * 27 and sizes[5:] == (0,) * 27
    assert data[578:591] == b"console=ttyS0"


# serde_cbor's encoding, as AWS's image-format crate pins it in its tests (the
# crate checks its newer encoder against bytes written by serde_cbor 0.11).
AWS_PCR_INFO_0_TO_47 = (
    "a26e72656769737465725f696e646578006e72656769737465725f76616c75659830000102030405060708090a0b0c"
    "0d0e0f101112131415161718181819181a181b181c181d181e181f1820182118221823182418251826182718281829"
    "182a182b182c182d182e182f"
)
AWS_SIGNATURE_SECTION = (
    "81a2737369676e696e675f6365727469666963617465983b182d182d182d182d182d1842184518471849184e1820"
    "18431845185218541849184618491843184118541845182d182d182d182d182d0a184d1849184918420a182d182d"
    "182d182d182d1845184e1844182018431845185218541849184618491843184118541845182d182d182d182d182d"
    "0a697369676e61747572658a18d21884184418a1011838182218a018401840"
)


def test_pcr_info_payload_is_serde_cbor() -> None:
    assert pcr_info_payload(0, bytes(range(48))).hex() == AWS_PCR_INFO_0_TO_47


def test_signature_section_is_serde_cbor() -> None:
    entry = PcrSignature(b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
                         bytes([0xD2, 0x84, 0x44, 0xA1, 0x01, 0x38, 0x22, 0xA0, 0x40, 0x40]))
    assert encode_signature_section([entry]).hex() == AWS_SIGNATURE_SECTION
