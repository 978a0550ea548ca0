"""Build -> read -> measure round trips on random sections (hypothesis), files on disk."""

from __future__ import annotations

import hashlib
import io
import json
import os
import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtio_nsm.eif import (
    Arch,
    EifError,
    Identity,
    SectionType,
    build_eif,
    build_stream,
    read_eif,
    read_stream,
    sign_eif,
)
from virtio_nsm.eif.format import crc32_combine
from virtio_nsm.eif.metadata import dumps

ZERO = bytes(48)


def _extend_hash(data: bytes) -> bytes:
    return hashlib.sha384(ZERO + hashlib.sha384(data).digest()).digest()


sections = st.tuples(
    st.binary(max_size=3000),
    st.text(alphabet=st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=200),
    st.lists(st.binary(max_size=2000), min_size=1, max_size=5),
    st.one_of(st.none(), st.binary(max_size=300).map(lambda b: json.dumps({"k": b.hex()}).encode())),
)


@settings(max_examples=60, deadline=None)
@given(sections)
def test_random_sections_round_trip(parts) -> None:

    kernel, cmdline, ramdisks, metadata = parts
    out = io.BytesIO()
    result = build_stream(out, kernel=io.BytesIO(kernel), cmdline=cmdline,
                          ramdisks=[io.BytesIO(r) for r in ramdisks], metadata=metadata)
    data = out.getvalue()
    raw_cmdline = cmdline.encode()
    meta_size = 0 if metadata is None else 12 + len(metadata)
    assert len(data) == (548 + 12 * (2 + len(ramdisks)) + len(kernel) + len(raw_cmdline)
                         + sum(map(len, ramdisks)) + meta_size)
    assert zlib.crc32(data[:544] + data[548:]) == int.from_bytes(data[544:548], "big") == result.crc
    image = read_stream(io.BytesIO(data))
    assert image.crc_ok
    m = image.measurements
    assert m == result.measurements
    assert m.pcr0 == _extend_hash(kernel + raw_cmdline + b"".join(ramdisks))
    assert m.pcr1 == _extend_hash(kernel + raw_cmdline + ramdisks[0])
    assert m.pcr2 == _extend_hash(b"".join(ramdisks[1:]))
    assert [s.type for s in image.sections] == [SectionType.KERNEL, SectionType.CMDLINE] + (
        [] if metadata is None else [SectionType.METADATA]) + [SectionType.RAMDISK] * len(ramdisks)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600), st.binary(max_size=600))
def test_crc32_combine_matches_zlib(a: bytes, b: bytes) -> None:
    assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


def test_files_on_disk_round_trip(tmp_path, signer) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(os.urandom(3 << 20 | 17))  # several chunks
    ramdisks = []
    for n, size in enumerate((5000, 2 << 20, 0)):
        path = tmp_path / f"r{n}.cpio"
        path.write_bytes(os.urandom(size))
        ramdisks.append(path)
    identity = Identity("hello", "2.0", "2026-11-29T20:00:00+00:00", "virtio-nsm", "0.1.0",
                        custom_metadata={"b": [1, 2.5], "a": "x"})
    output = tmp_path / "out.eif"
    result = build_eif(output, kernel=kernel, cmdline="console=ttyS0 quiet", ramdisks=ramdisks,
                       metadata=identity, arch=Arch.AARCH64, default_mem=512 << 20, default_cpus=4,
                       signer=signer)
    image = read_eif(output)
    assert image.crc_ok and image.signature_check().valid  # type: ignore[union-attr]
    assert image.measurements == result.measurements and result.size == output.stat().st_size
    assert image.arch is Arch.AARCH64
    assert (image.header.default_mem, image.header.default_cpus) == (512 << 20, 4)
    all_ramdisks = b"".join(p.read_bytes() for p in ramdisks)
    k = kernel.read_bytes()
    assert image.measurements.pcr0 == _extend_hash(k + b"console=ttyS0 quiet" + all_ramdisks)
    assert image.measurements.pcr2 == _extend_hash(b"".join(p.read_bytes() for p in ramdisks[1:]))
    described = image.describe()
    assert described["ImageName"] == "hello" and described["ImageVersion"] == "2.0"
    assert described["Metadata"] == {
        "BuildTime": "2026-11-29T20:00:00+00:00", "BuildTool": "virtio-nsm", "BuildToolVersion": "0.1.0",
        "OperatingSystem": "OS", "KernelVersion": "kernel", "DockerInfo": None, "a": "x", "b": [1, 2.5]}
    meta = next(s for s in image.sections if s.type is SectionType.METADATA)
    raw = output.read_bytes()[meta.offset + 12: meta.offset + 12 + meta.size]
    assert raw == (b'{"ImageName":"hello","ImageVersion":"2.0","BuildMetadata":{"BuildTime":'
                   b'"2026-11-29T20:00:00+00:00","BuildTool":"virtio-nsm","BuildToolVersion":"0.1.0",'
                   b'"OperatingSystem":"OS","KernelVersion":"kernel"},"DockerInfo":null,'
                   b'"CustomMetadata":{"a":"x","b":[1,2.5]}}')
    # sign in place again (replace): the file stays valid, mode kept
    output.chmod(0o640)
    sign_eif(output, signer)
    again = read_eif(output)
    assert again.crc_ok and again.signature_check().valid  # type: ignore[union-attr]
    assert (output.stat().st_mode & 0o777) == 0o640
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_metadata_that_the_reader_refuses_is_not_written() -> None:
    with pytest.raises(EifError, match="not a JSON object"):
        build_stream(io.BytesIO(), kernel=io.BytesIO(b"k"), cmdline="", ramdisks=[io.BytesIO(b"r")],
                     metadata=b"[]")


def test_failed_build_leaves_no_file(tmp_path) -> None:
    kernel = tmp_path / "k"
    kernel.write_bytes(b"K")
    output = tmp_path / "out.eif"
    with pytest.raises(ValueError, match="NUL"):
        build_eif(output, kernel=kernel, cmdline="a\0b", ramdisks=[kernel], metadata=None)
    assert list(tmp_path.iterdir()) == [kernel]


def test_serde_json_formatting() -> None:
    value = {"z": 1, "a": [True, None, 1.0, 0.1, 1e20, 1e-7, 1e-5, -0.0, 2**64, -(2**63)],
             "é": "quote\" backslash\\ nl\n ctl\x01 del\x7f uni\u2028", "n": {"b": {}, "a": []}}
    assert dumps(value) == (
        '{"a":[true,null,1.0,0.1,1e20,1e-7,0.00001,-0.0,1.8446744073709552e19,-9223372036854775808],'
        '"n":{"a":[],"b":{}},"z":1,"é":"quote\\" backslash\\\\ nl\\n ctl\\u0001 del\x7f uni\u2028"}'
    )


def test_build_time_and_kernel_config_like_nitro_cli() -> None:
    import datetime as dt

    from virtio_nsm.eif.metadata import kernel_config_identity, rfc3339
    utc = dt.UTC
    assert rfc3339(dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=utc)) == "2026-01-02T03:04:05+00:00"
    assert rfc3339(dt.datetime(2026, 1, 2, 3, 4, 5, 120000, tzinfo=utc)) == "2026-01-02T03:04:05.120+00:00"
    assert rfc3339(dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=utc)) == "2026-01-02T03:04:05.123456+00:00"
    config = "#\n# Automatically generated file; DO NOT EDIT.\n# Linux/x86_64 6.12.48-1-amd64 Kernel Configuration\n"
    assert kernel_config_identity(config) == ("Linux", "6.12.48")


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 3 << 20), min_size=1, max_size=3), st.integers(0, 3 << 20))
def test_two_thread_hashing_gives_the_same_image(ramdisk_sizes, kernel_size) -> None:
    """Chunk boundaries, double buffering and thread hand-offs never change a value."""

    rng = __import__("random").Random(kernel_size * 31 + sum(ramdisk_sizes))
    kernel = rng.randbytes(kernel_size)
    ramdisks = [rng.randbytes(n) for n in ramdisk_sizes]
    out = io.BytesIO()
    build_stream(out, kernel=io.BytesIO(kernel), cmdline="c", ramdisks=[io.BytesIO(r) for r in ramdisks],
                 metadata=None)
    data = out.getvalue()
    parallel = read_stream(io.BytesIO(data), parallel=True)
    single = read_stream(io.BytesIO(data), parallel=False)
    assert parallel == single and parallel.crc_ok
    assert parallel.measurements.pcr0 == _extend_hash(kernel + b"c" + b"".join(ramdisks))
    assert parallel.measurements.pcr2 == _extend_hash(b"".join(ramdisks[1:]))


def test_metadata_json_is_as_strict_as_serde_json() -> None:
    import pytest

    from virtio_nsm.eif.metadata import parse_custom_metadata, parse_metadata_section
    for bad, message in [(b'{"a": NaN}', "not JSON"), (b"[" * 129 + b"]" * 129, "deeper than 128"),
                         (b"\xff", "not JSON")]:
        with pytest.raises(ValueError, match=message):
            parse_custom_metadata(bad)
        with pytest.raises(EifError, match=message):
            parse_metadata_section(bad)
    assert parse_custom_metadata(b"[" * 128 + b"]" * 128) is not None
    deep = b'{"a":' * 2000 + b"1" + b"}" * 2000
    with pytest.raises(EifError):
        parse_metadata_section(deep)


def test_build_refuses_a_lone_surrogate_in_the_command_line() -> None:
    with pytest.raises(ValueError, match=r"not valid UTF-8 text \(character 4"):
        build_stream(io.BytesIO(), kernel=io.BytesIO(b"k"), cmdline="abc \udcff", ramdisks=[io.BytesIO(b"r")],
                     metadata=None)
