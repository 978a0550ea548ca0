"""Device commands: describe, pcr, random, attest; and the local CA (``nsm ca``)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import stat
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, ParamSpec, TypeVar

import click

from ..client import DEFAULT_DEVICE, DEVICE_ENV, LOCAL_DEVICE, Nsm
from ..errors import ConfigurationError, DeviceNotFoundError, NsmError, TransportError
from ..nsm.device import NsmDevice
from ..nsm.pki import CertificateAuthority
from ..nsm.protocol import MAX_REQUEST_SIZE
from ..persist import ROOT_CERT_FILE, ROOT_KEY_FILE, default_ca_dir, load_ca, save_ca
from . import main
from .inputs import InputError, read_input

P = ParamSpec("P")
T = TypeVar("T")

#: Exit status of an error answer from the device.
EXIT_NSM_ERROR = 1
#: Exit status of a usage, I/O or transport problem.
EXIT_USAGE = 2


def fail(message: str, status: int = EXIT_USAGE) -> NoReturn:
    click.echo(f"nsm: {message}", err=True)
    sys.exit(status)


#: Commands that talk to a device: they take ``--device``, also before their name
#: (``nsm --device local describe``).
DEVICE_COMMANDS = frozenset({"describe", "pcr", "random", "attest"})
#: Where :data:`main` keeps a ``--device`` given before the subcommand.
_GROUP_DEVICE = "virtio_nsm.device"


def device_options(f: Callable[P, T]) -> Callable[P, T]:
    f = click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)
    f = click.option(
        "--device", default=None, metavar="DEV",
        help=f"/dev/nsm path, vhost-user:SOCKET or local (a throwaway in-process device). "
        f"Default: `nsm --device DEV` before the command, else ${DEVICE_ENV}, else {DEFAULT_DEVICE}.",
    )(f)
    return f


def resolve_device(device: str | None) -> str:
    """``--device`` after the command, else before it, else ``$NSM_DEVICE``, else /dev/nsm."""
    if device is not None:
        return device
    ctx = click.get_current_context(silent=True)
    before = ctx.meta.get(_GROUP_DEVICE) if ctx is not None else None
    return before or os.environ.get(DEVICE_ENV) or DEFAULT_DEVICE


@contextmanager
def open_device(device: str, *, signs: bool = False) -> Iterator[Nsm]:
    """Open ``device``; ``signs``: the command makes a document (see :func:`local_device`)."""
    try:
        nsm = Nsm.local(local_device()) if device == LOCAL_DEVICE and signs else Nsm.open(device)
    except DeviceNotFoundError as exc:
        fail(str(exc.strerror))
    except (TransportError, OSError, ConfigurationError) as exc:
        fail(f"cannot open {device}: {getattr(exc, 'strerror', None) or exc}")
    try:
        yield nsm
    except NsmError as exc:
        fail(f"device answered {exc.code.name}" + (f" ({exc.detail})" if exc.detail else ""),
             EXIT_NSM_ERROR)
    except TransportError as exc:
        fail(f"transport failed: {exc.strerror or exc}")
    finally:
        nsm.close()


def write_output(output: str, data: bytes, option: str = "-o", *, private: bool = False) -> None:
    """Write ``data`` to the file ``output`` atomically (``-``: standard output).

    The bytes go to a new temporary file of a name nobody else uses
    (:func:`tempfile.mkstemp`) in the same directory, are fsync'ed and renamed over
    ``output``: a reader sees the old file or the whole new one, and no other file is
    ever opened, truncated or removed (a user's ``output.tmp`` included). A refused or
    failed write leaves nothing behind.
    An existing file keeps its permissions; a new one gets 0666 minus the umask, or
    0600 with ``private`` (device state).
    """
    if output == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    path = Path(output)
    if path.name in ("", ".", ".."):
        fail(f"{option}: {output!r} is not a file name")
    tmp: Path | None = None
    try:
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except FileNotFoundError:
            umask = os.umask(0)
            os.umask(umask)
            mode = 0o600 if private else 0o666 & ~umask
        # a new name (O_EXCL), short so that it fits wherever the target's name does
        fd, name = tempfile.mkstemp(prefix=".nsm-", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        tmp = None
    except OSError as exc:
        fail(f"{option}: cannot write {output}: {exc.strerror or exc}")
    finally:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def emit(as_json: bool, data: dict[str, Any], text: str) -> None:
    click.echo(json.dumps(data, indent=2) if as_json else text)


def parse_hex(value: str, what: str) -> bytes:
    try:
        return bytes.fromhex(value.removeprefix("0x"))
    except ValueError:
        raise click.BadParameter(f"{what} must be hexadecimal") from None


def hex_or_file(value: str | None, what: str) -> bytes | None:
    """HEX, or @FILE for a file's raw bytes."""
    if value is None:
        return None
    if value.startswith("@"):
        return read_small_input(value[1:], f"{what} file {value[1:]}", allow_stdin=False)
    return parse_hex(value, what)


def read_small_input(path: str, what: str, *, allow_stdin: bool = True) -> bytes:
    """A file's bytes for one request field: capped at the request size limit."""
    try:
        return read_input(path, limit=MAX_REQUEST_SIZE, what=what, allow_stdin=allow_stdin)
    except InputError as exc:
        fail(str(exc))


def pcr_index(f: Callable[P, T]) -> Callable[P, T]:
    return click.argument("index", type=click.IntRange(0, 0xFFFF))(f)


def _with_device(f: Callable[..., None], *, signs: bool = False) -> Callable[..., None]:
    @functools.wraps(f)
    def wrapper(device: str | None, as_json: bool, **kwargs: Any) -> None:
        with open_device(resolve_device(device), signs=signs) as nsm:
            f(nsm, as_json, **kwargs)

    return device_options(wrapper)


def _signing_device(f: Callable[..., None]) -> Callable[..., None]:
    return _with_device(f, signs=True)


@main.command()
@_with_device
def describe(nsm: Nsm, as_json: bool) -> None:
    """Describe the device (DescribeNSM)."""
    d = nsm.describe_nsm()
    data = {
        "version": f"{d.version_major}.{d.version_minor}.{d.version_patch}",
        "module_id": d.module_id, "digest": d.digest, "max_pcrs": d.max_pcrs,
        "locked_pcrs": list(d.locked_pcrs),
    }
    emit(as_json, data, "\n".join((
        f"module_id:   {d.module_id}",
        f"version:     {data['version']}",
        f"digest:      {d.digest}",
        f"max_pcrs:    {d.max_pcrs}",
        f"locked_pcrs: {_ranges(d.locked_pcrs)}",
    )))


def _ranges(indices: tuple[int, ...]) -> str:
    if not indices:
        return "none"
    parts, start, prev = [], indices[0], indices[0]
    for i in (*indices[1:], None):
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


@main.group()
def pcr() -> None:
    """Read, extend and lock PCRs."""


@pcr.command("get")
@pcr_index
@_with_device
def pcr_get(nsm: Nsm, as_json: bool, index: int) -> None:
    """Show PCR INDEX and whether it is locked (DescribePCR)."""
    d = nsm.describe_pcr(index)
    emit(as_json, {"index": index, "locked": d.lock, "data": d.data.hex()},
         f"PCR{index} {'locked' if d.lock else 'unlocked'} {d.data.hex()}")


@pcr.command("extend")
@pcr_index
@click.option("--data", "data_hex", metavar="HEX", help="Data to extend with, in hex.")
@click.option("--file", "data_file", type=click.Path(dir_okay=False, allow_dash=True),
              help="Extend with this file's bytes ('-' for standard input).")
@_with_device
def pcr_extend(nsm: Nsm, as_json: bool, index: int, data_hex: str | None,
               data_file: str | None) -> None:
    """Extend PCR INDEX: new = H(old || data) (ExtendPCR)."""
    if (data_hex is None) == (data_file is None):
        raise click.UsageError("give exactly one of --data HEX or --file F")
    if data_hex is not None:
        data = parse_hex(data_hex, "--data")
    else:
        assert data_file is not None
        data = read_small_input(data_file, "standard input" if data_file == "-" else data_file)
    value = nsm.extend_pcr(index, data)
    emit(as_json, {"index": index, "data": value.hex()}, f"PCR{index} {value.hex()}")


@pcr.command("lock")
@pcr_index
@_with_device
def pcr_lock(nsm: Nsm, as_json: bool, index: int) -> None:
    """Lock PCR INDEX for the life of the device (LockPCR)."""
    nsm.lock_pcr(index)
    emit(as_json, {"index": index, "locked": True}, f"PCR{index} locked")


@pcr.command("lock-range")
@click.argument("range_", metavar="RANGE", type=click.IntRange(0, 0xFFFF))
@_with_device
def pcr_lock_range(nsm: Nsm, as_json: bool, range_: int) -> None:
    """Lock PCRs 0 .. RANGE-1 (LockPCRs)."""
    nsm.lock_pcrs(range_)
    emit(as_json, {"range": range_, "locked": list(range(range_))},
         f"PCR0-{range_ - 1} locked" if range_ else "nothing to lock")


@main.command()
@click.option("--bytes", "count", type=click.IntRange(1, 1 << 20), default=256, show_default=True,
              help="How many random bytes (GetRandom gives 256 per request).")
@_with_device
def random(nsm: Nsm, as_json: bool, count: int) -> None:
    """Random bytes from the device (GetRandom), in hex."""
    out = bytearray()
    while len(out) < count:
        out += nsm.get_random()
    data = bytes(out[:count])
    emit(as_json, {"random": data.hex()}, data.hex())


# The inputs are read while the options are parsed, before the device is opened:
# a bad file fails the command before anything (e.g. the default CA) is created.
def _early_hex(ctx: click.Context, param: click.Parameter, value: str | None) -> bytes | None:
    return None if value is None else parse_hex(value, f"--{param.name}".replace("_", "-"))


def _early_hex_or_file(ctx: click.Context, param: click.Parameter, value: str | None) -> bytes | None:
    return hex_or_file(value, f"--{param.name}".replace("_", "-"))


@main.command()
@click.option("--nonce", metavar="HEX", help="Nonce, in hex.", callback=_early_hex)
@click.option("--user-data", metavar="HEX|@FILE", help="User data, in hex or @FILE.",
              callback=_early_hex_or_file)
@click.option(
    "--public-key", metavar="@FILE|HEX", callback=_early_hex_or_file,
    help="Public key bytes to put in the document, @FILE or hex (at most 1024 bytes; the NSM "
    "does not look inside). E.g. a P-384 key in DER: openssl ecparam -name secp384r1 -genkey "
    "-noout -out key.pem && openssl ec -in key.pem -pubout -outform DER -out pk.der, "
    "then --public-key @pk.der.",
)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, allow_dash=True),
              help="Where to write the document (raw COSE_Sign1; '-' for standard output).")
@_signing_device
def attest(nsm: Nsm, as_json: bool, nonce: bytes | None, user_data: bytes | None,
           public_key: bytes | None, output: str) -> None:
    """Get a signed attestation document (Attestation).

    With --device local, the document is signed by the default CA (created on
    first use, like `nsm ca init`): `nsm ca root` prints the root to verify it with.
    """
    document = nsm.attestation(user_data=user_data, nonce=nonce, public_key=public_key)
    write_output(output, document)
    if output != "-":
        emit(as_json, {"document": output, "size": len(document)},
             f"wrote {len(document)}-byte attestation document to {output}")


@main.group()
def ca() -> None:
    """The attestation CA (root key and certificate) that signs documents.

    \b
    One default CA signs every document made on this machine: by `nsm serve`
    (a new state directory keeps a copy of it), `nsm serve --ephemeral` (when it
    exists) and `nsm attest --device local`. `nsm ca init` creates it; so does
    the first `nsm serve` or local attestation that needs it. `nsm ca root`
    prints its certificate:  nsm ca root > root.pem; nsm verify doc.cose --root root.pem
    """


def default_ca(*, create: bool) -> tuple[CertificateAuthority | None, bool]:
    """The default CA (:func:`default_ca_dir`) and whether this call created it.

    ``None`` when it does not exist and ``create`` is false. Raises
    ``ConfigurationError`` when it exists but cannot be read.
    """
    directory = default_ca_dir()
    if not (directory / ROOT_CERT_FILE).exists() and not (directory / ROOT_KEY_FILE).exists():
        if not create:
            return None, False
        try:
            save_ca(CertificateAuthority.generate(), directory)
            return load_ca(directory), True
        except ConfigurationError:
            pass  # created meanwhile by another process: load that one
        except OSError as exc:
            raise ConfigurationError(f"cannot create the default CA in {directory}: "
                                     f"{exc.strerror or exc}") from None
    return load_ca(directory), False


def local_device() -> NsmDevice:
    """A throwaway in-process device that signs with the default CA (created if missing)."""
    try:
        authority, created = default_ca(create=True)
    except ConfigurationError as exc:
        fail(f"{exc} (the default CA signs documents of --device local)")
    if created:
        click.echo(f"nsm: created the default CA in {default_ca_dir()} (`nsm ca root` prints "
                   "its root)", err=True)
    return NsmDevice(ca=authority)


def _ca_dir_option(f: Callable[P, T]) -> Callable[P, T]:
    return click.option(
        "--dir", "directory", type=click.Path(file_okay=False, path_type=Path),
        default=None, help=f"CA directory (default {default_ca_dir()}).",
    )(f)


@ca.command("init")
@_ca_dir_option
def ca_init(directory: Path | None) -> None:
    """Create a CA (root key 0600, certificate); by default the one that signs everything."""
    directory = directory or default_ca_dir()
    try:
        save_ca(CertificateAuthority.generate(), directory)
    except ConfigurationError as exc:
        where = "" if directory == default_ca_dir() else f" --dir {directory}"
        fail(f"{exc} (`nsm ca root{where}` prints its root)")
    except OSError as exc:
        fail(f"cannot create a CA in {directory}: {exc.strerror or exc}")
    click.echo(f"created CA in {directory}")


def _exists(path: Path, what: str) -> bool:
    """Whether ``path`` exists; a name the system refuses (too long, ...) is a one-line error."""
    try:
        os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return False
    except OSError as exc:
        fail(f"{what}: cannot use {path}: {exc.strerror or exc}")
    return True


@ca.command("root")
@click.option("--dir", "directory", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="A CA directory (e.g. made by `nsm ca init --dir`).")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The CA of the `nsm serve` state directory DIR (its ca/).")
def ca_root(directory: Path | None, state_dir: Path | None) -> None:
    """Print a root certificate (PEM), the trust anchor for its documents.

    Default: the default CA's (see `nsm ca --help`), which signs documents of
    `nsm serve`, `nsm attest --device local` and `nsm vm run`.
    """
    from ..persist import CA_DIR

    if directory is not None and state_dir is not None:
        raise click.UsageError("give --dir or --state-dir, not both")
    if state_dir is not None:
        directory = state_dir / CA_DIR
        if not _exists(directory, "--state-dir"):
            fail(f"{state_dir} holds no CA (is it a state directory? `nsm serve --state-dir "
                 f"{state_dir}` creates one)")
    elif directory is None:
        directory = default_ca_dir()
        if not _exists(directory, "the default CA directory"):
            fail(f"no default CA in {directory} yet: create it with `nsm ca init` (the first "
                 "`nsm serve` or `nsm attest --device local` also does)")
    try:
        authority = load_ca(directory)
    except ConfigurationError as exc:
        fail(f"{exc} (a CA directory holds root.pem and root-key.pem, e.g. from `nsm ca init "
             f"--dir {directory}`)")
    click.echo(authority.certificate_pem.decode("ascii"), nl=False)
