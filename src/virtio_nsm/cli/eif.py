"""``nsm eif``: build, describe, sign and measure enclave image files.

Option names follow nitro-cli (``--eif-path``, ``--signing-certificate``,
``--private-key``, ``pcr --input``) and AWS's ``eif_build`` (``--kernel``,
``--cmdline``, ``--ramdisk``, ``--name``, ``--version``, ``--metadata``,
``--arch``); ``--json`` prints nitro-cli's JSON objects with its field names.
Exit status: 0 done, 2 bad input (a malformed image, an unreadable file).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from importlib import metadata as package_metadata
from pathlib import Path
from typing import Any

import click

from ..eif import Arch, BootConfig, EifError, EifImage, Identity, Signer, build_eif, read_eif, sign_eif
from ..eif.boot import PreparedBoot
from ..eif.format import DEFAULT_CPUS, DEFAULT_MEMORY
from ..eif.measure import Measurements, extend
from ..eif.metadata import kernel_config_identity, parse_custom_metadata, rfc3339
from ..eif.reader import open_regular
from ..eif.signature import certificate_der
from . import main
from .device import fail
from .inputs import InputError, read_input

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _read(path: Path, what: str, limit: int = 1 << 20) -> bytes:
    try:
        return read_input(str(path), limit=limit, what=f"{what} {path}", allow_stdin=False)
    except InputError as exc:
        fail(str(exc))


def _signer(certificate: Path | None, key: Path | None) -> Signer | None:
    if certificate is None and key is None:
        return None
    if certificate is None or key is None:
        fail("signing needs both --signing-certificate and --private-key")
    try:
        return Signer.from_pem(_read(key, "private key"), _read(certificate, "certificate"))
    except (ValueError, EifError) as exc:
        fail(str(exc))


def _measurements_text(measurements: Measurements) -> str:
    return "\n".join(f"PCR{i}  {v.hex()}" for i, v in measurements.as_dict().items())


def _emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def _json_option(f: Any) -> Any:
    return click.option("--json", "as_json", is_flag=True, help="Print nitro-cli's JSON.")(f)


@main.group()
def eif() -> None:
    """Enclave image files (EIF): build, describe, sign, measure."""


@eif.command()
@click.option("--kernel", type=_FILE, required=True, help="bzImage (x86_64) or Image (aarch64).")
@click.option("--kernel-config", type=_FILE, default=None,
              help="The kernel's .config: OperatingSystem and KernelVersion in the metadata come "
                   "from its third line, as nitro-cli does.")
@click.option("--cmdline", required=True, help="Kernel command line.")
@click.option("--ramdisk", "ramdisks", type=_FILE, multiple=True, required=True,
              help="A ramdisk (cpio archive); repeat in boot order (the first is the bootstrap "
                   "ramdisk measured in PCR1, the others in PCR2).")
@click.option("--name", default=None, help="ImageName (default: the kernel's file name).")
@click.option("--version", "image_version", default="1.0", show_default=True, help="ImageVersion.")
@click.option("--metadata", type=_FILE, default=None,
              help="JSON file of custom metadata (at most 4096 bytes, as nitro-cli).")
@click.option("--arch", type=click.Choice([a.value for a in Arch]), default=Arch.X86_64.value,
              show_default=True, help="Image architecture (header flag).")
@click.option("--memory", type=click.IntRange(1, (1 << 44) - 1), default=DEFAULT_MEMORY >> 20,
              show_default=True, help="Default enclave memory in MiB (header).")
@click.option("--cpus", type=click.IntRange(1, (1 << 63) - 1), default=DEFAULT_CPUS, show_default=True,
              help="Default enclave CPU count (header).")
@click.option("--build-time", default=None,
              help="BuildTime in the metadata (ISO 8601; default now) for reproducible images.")
@click.option("--signing-certificate", type=_FILE, default=None, help="PEM certificate to sign with.")
@click.option("--private-key", type=_FILE, default=None, help="PEM ECDSA private key of the certificate.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="Where to write the image.")
@_json_option
def build(kernel: Path, kernel_config: Path | None, cmdline: str, ramdisks: tuple[Path, ...],
          name: str | None, image_version: str, metadata: Path | None, arch: str, memory: int,
          cpus: int, build_time: str | None, signing_certificate: Path | None,
          private_key: Path | None, output: Path, as_json: bool) -> None:
    """Build an image from a kernel, a command line and ramdisks; print its PCRs."""
    for value, option in ((cmdline, "--cmdline"), (name, "--name"), (image_version, "--version")):
        require_text(value, option)  # all end up in the image as UTF-8 text
    signer = _signer(signing_certificate, private_key)
    custom = None
    if metadata is not None:
        try:
            custom = parse_custom_metadata(_read(metadata, "metadata file", 1 << 16))
        except ValueError as exc:
            fail(str(exc))
    system, kernel_version = "OS", "kernel"
    if kernel_config is not None:
        try:
            system, kernel_version = kernel_config_identity(
                _read(kernel_config, "kernel config", 1 << 24).decode("utf-8", "replace"))
        except ValueError as exc:
            fail(f"{kernel_config}: {exc}")
    when = dt.datetime.now(dt.UTC)
    if build_time is not None:
        try:
            when = dt.datetime.fromisoformat(build_time)
        except ValueError:
            fail(f"--build-time {build_time!r} is not ISO 8601")
        if when.tzinfo is None:
            when = when.replace(tzinfo=dt.UTC)
    identity = Identity(
        image_name=name if name is not None else kernel.name,
        image_version=image_version,
        build_time=rfc3339(when),
        build_tool="virtio-nsm",
        build_tool_version=package_metadata.version("virtio-nsm"),
        operating_system=system,
        kernel_version=kernel_version,
        custom_metadata=custom,
    )
    try:
        result = build_eif(output, kernel=kernel, cmdline=cmdline, ramdisks=ramdisks, metadata=identity,
                           arch=Arch(arch), default_mem=memory << 20, default_cpus=cpus, signer=signer)
    except (EifError, ValueError) as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot build {output}: {exc.strerror or exc}")
    click.echo(f"Enclave image written to {output} ({result.size} bytes).", err=True)
    _emit(as_json, {"Measurements": result.measurements.to_json()},
          _measurements_text(result.measurements))


def _load(path: Path) -> EifImage:
    try:
        return read_eif(path)
    except EifError as exc:
        fail(f"{path}: {exc}")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror or exc}")


def _describe_text(path: Path, image: EifImage, data: dict[str, Any]) -> str:
    lines = [f"{path}: EIF version {image.version}, {image.arch.value}, {image.file_size} bytes, "
             f"CRC {'ok' if image.crc_ok else 'MISMATCH (the file is damaged)'}"]
    if "ImageName" in data or "ImageVersion" in data:
        lines.append(f"Image     {data.get('ImageName', '?')} {data.get('ImageVersion', '')}".rstrip())
    lines.append(f"Defaults  {image.header.default_mem >> 20} MiB, {image.header.default_cpus} CPUs")
    lines.append("Sections  " + ", ".join(f"{s.type.label} {s.size}" for s in image.sections))
    lines.append(_measurements_text(image.measurements))
    check = image.signature_check()
    if check is None:
        lines.append("Signed    no")
    else:
        issuer = ", ".join(f"{k}={v}" for k, v in data["SigningCertificate"]["IssuerName"].items())
        lines.append(f"Signed    {'signature valid' if check.valid else 'SIGNATURE INVALID'}: {check.reason}")
        lines.append(f"Signer    issued by {issuer}; valid {data['SigningCertificate']['NotBefore']} "
                     f"to {data['SigningCertificate']['NotAfter']}")
    meta = data.get("Metadata")
    if meta:
        lines.append("Metadata  " + json.dumps(meta, ensure_ascii=False))
    return "\n".join(lines)


@eif.command()
@click.option("--eif-path", type=_FILE, required=True, help="The image.")
@_json_option
def describe(eif_path: Path, as_json: bool) -> None:
    """Check an image and print its version, PCRs, CRC and signature status."""
    image = _load(eif_path)
    try:
        data = image.describe()
    except EifError as exc:
        fail(f"{eif_path}: {exc}")
    _emit(as_json, data, _describe_text(eif_path, image, data))


@eif.command()
@click.option("--eif-path", type=_FILE, required=True, help="The image (changed in place unless -o).")
@click.option("--signing-certificate", type=_FILE, required=True, help="PEM certificate.")
@click.option("--private-key", type=_FILE, required=True, help="PEM ECDSA private key.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the signed image here instead of replacing the input.")
@_json_option
def sign(eif_path: Path, signing_certificate: Path, private_key: Path, output: Path | None,
         as_json: bool) -> None:
    """Add or replace an image's PCR0 signature (the CRC is updated)."""
    signer = _signer(signing_certificate, private_key)
    assert signer is not None
    try:
        result = sign_eif(eif_path, signer, output)
    except EifError as exc:
        fail(f"{eif_path}: {exc}")
    except OSError as exc:
        fail(f"cannot sign {eif_path}: {exc.strerror or exc}")
    click.echo(f"Enclave image signed: {output or eif_path}.", err=True)
    _emit(as_json, {"Measurements": result.measurements.to_json()},
          _measurements_text(result.measurements))


@eif.command()
@click.option("--input", "input_path", type=_FILE, default=None,
              help="Any file: prints extend(SHA-384 of its bytes) as PCR.")
@click.option("--signing-certificate", type=_FILE, default=None,
              help="A PEM certificate: prints the PCR8 of images it signs.")
@_json_option
def pcr(input_path: Path | None, signing_certificate: Path | None, as_json: bool) -> None:
    """The PCR value nitro-cli's `pcr` command prints for a file or a certificate."""
    if (input_path is None) == (signing_certificate is None):
        fail("give exactly one of --input and --signing-certificate")
    if signing_certificate is not None:
        try:
            der = certificate_der(_read(signing_certificate, "certificate"))
        except EifError as exc:
            fail(f"{signing_certificate}: {exc}")
        value, key = extend(hashlib.sha384(der).digest()), "PCR8"
    else:
        assert input_path is not None
        digest = hashlib.sha384()
        try:
            with open_regular(input_path) as fh:
                while chunk := fh.read(1 << 20):
                    digest.update(chunk)
        except EifError as exc:
            fail(str(exc))
        except OSError as exc:
            fail(f"cannot read {input_path}: {exc.strerror or exc}")
        value, key = extend(digest.digest()), "PCR"
    _emit(as_json, {key: value.hex()}, f"{key}  {value.hex()}")


# --- boot options for `nsm serve` and `nsm vm run` --------------------------------


def _parse_boot_pcrs(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> dict[int, bytes]:
    pcrs: dict[int, bytes] = {}
    for item in values:
        index_text, sep, hex_value = item.partition("=")
        if not sep or not index_text.strip().isdigit():
            raise click.BadParameter(f"{item!r} is not N=HEX", param=param)
        index = int(index_text)
        if not 0 <= index <= 15:
            raise click.BadParameter(f"PCR{index}: only PCR0-15 are set at boot", param=param)
        if index in pcrs:
            raise click.BadParameter(f"PCR{index} given twice", param=param)
        try:
            value = bytes.fromhex(hex_value.strip().removeprefix("0x"))
        except ValueError:
            raise click.BadParameter(f"PCR{index}: {hex_value!r} is not hexadecimal", param=param) from None
        if len(value) != 48:
            raise click.BadParameter(f"PCR{index} is {len(value)} bytes, SHA-384 PCRs are 48", param=param)
        pcrs[index] = value
    return pcrs


BOOT_OPTION_NAMES = ("eif", "parent_instance_id", "parent_role_arn", "debug_mode", "boot_pcrs", "module_id")


def boot_options(f: Any) -> Any:
    """The options of a production enclave's boot configuration (``nsm serve``, ``nsm vm run``)."""
    for option in reversed((
        click.option("--eif", type=_FILE, default=None,
                     help="Report this enclave image's measurements: PCR0/1/2 (and PCR8 if signed), "
                          "PCR3/4 from the parent, other boot PCRs zero, PCR0-15 locked."),
        click.option("--parent-instance-id", default=None, metavar="ID",
                     help="Parent instance id (PCR4, and the module id <ID>-enc<16 hex>); "
                          "default: a random one."),
        click.option("--parent-role-arn", default=None, metavar="ARN",
                     help="The parent instance's IAM role (PCR3; zero without one)."),
        click.option("--debug-mode", is_flag=True,
                     help="A debug-mode enclave: every boot PCR (0-15) reads zero."),
        click.option("--pcr", "boot_pcrs", multiple=True, metavar="N=HEX", callback=_parse_boot_pcrs,
                     help="Set boot PCR N (0-15) to HEX (48 bytes), over the image's value; repeatable."),
        click.option("--module-id", default=None, help="The device's module id."),
    )):
        f = option(f)
    return f


def require_text(value: str | None, option: str) -> None:
    """Refuse a value that is not UTF-8 text: a non-UTF-8 argv byte arrives as a lone
    surrogate (surrogateescape), which no text field of a document or image can hold."""
    if value is None:
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raw = os.fsencode(value[exc.start:exc.end])  # the bytes as they were in argv
        raise click.BadParameter(f"is not valid UTF-8 text (the byte {raw!r} at character {exc.start})",
                                 param_hint=option) from None


def boot_config(eif: Path | None, parent_instance_id: str | None, parent_role_arn: str | None,
                debug_mode: bool, boot_pcrs: dict[int, bytes], module_id: str | None) -> BootConfig:
    """The :class:`BootConfig` of the :func:`boot_options` values."""
    for value, option in ((module_id, "--module-id"), (parent_instance_id, "--parent-instance-id"),
                          (parent_role_arn, "--parent-role-arn")):
        require_text(value, option)
    if module_id is not None and not 1 <= len(module_id.encode("utf-8")) <= 256:
        raise click.BadParameter("must be 1 to 256 bytes of text", param_hint="--module-id")
    if parent_instance_id is not None and not parent_instance_id:
        raise click.BadParameter("is empty", param_hint="--parent-instance-id")
    return BootConfig(eif=None if eif is None else str(eif), parent_instance_id=parent_instance_id,
                      parent_role_arn=parent_role_arn, debug_mode=debug_mode, pcrs=dict(boot_pcrs),
                      module_id=module_id)


def boot_argv(config: BootConfig) -> list[str]:
    """``nsm serve`` arguments that give the same boot configuration."""
    argv: list[str] = []
    if config.eif is not None:
        argv += ["--eif", str(Path(config.eif).resolve())]
    if config.parent_instance_id is not None:
        argv += ["--parent-instance-id", config.parent_instance_id]
    if config.parent_role_arn is not None:
        argv += ["--parent-role-arn", config.parent_role_arn]
    if config.debug_mode:
        argv.append("--debug-mode")
    for index, value in sorted(config.pcrs.items()):
        argv += ["--pcr", f"{index}={value.hex()}"]
    if config.module_id is not None:
        argv += ["--module-id", config.module_id]
    return argv


def prepare_boot(config: BootConfig) -> PreparedBoot:
    """Read and check the image of ``config``; a one-line error (exit 2) if it cannot boot."""
    try:
        return config.prepare()
    except EifError as exc:
        fail(f"{config.eif}: {exc}")
    except ValueError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot read {config.eif}: {exc.strerror or exc}")
