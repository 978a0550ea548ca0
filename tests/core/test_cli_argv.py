"""Every ``nsm`` command against hostile command-line text, through the real CLI.

The command tree is walked from :data:`virtio_nsm.cli.main`, so a new command or
option is covered as soon as it exists (a command without a baseline below fails
until it gets one). Each case runs ``python -m virtio_nsm`` in a subprocess with
argv given as bytes, so a non-UTF-8 byte reaches Python as the kernel passes it
(decoded with surrogateescape), with one hostile value for one option and valid
values (the command's baseline) for the others:

* a non-UTF-8 byte (``\\xff``, ``abc\\x80def``), an empty string, 100 KiB of text:
  accepted (exit 0, or the same end as the baseline where the baseline cannot
  finish here), or refused with a one-line message -- never a traceback or a
  hang, and a refused command leaves no file behind;
* for a path, a path with a non-UTF-8 byte in its name, made to exist (a copy of
  the baseline's file or directory): legal on Linux, so it must do what the
  baseline does.

Commands that serve until stopped are stopped with SIGTERM once they are up and
must end cleanly. The VM commands run as if we were not root: their set-up
then refuses before it fetches or boots anything, after their own
option parsing and validation ran.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import click
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from virtio_nsm._process import stop_process
from virtio_nsm.cli import main
from virtio_nsm.client import Nsm
from virtio_nsm.durable import DurableNsm
from virtio_nsm.eif import build_eif
from virtio_nsm.nsm.device import NsmDevice
from virtio_nsm.nsm.pki import CertificateAuthority
from virtio_nsm.persist import export_state, load_ca, save_ca

pytestmark = pytest.mark.slow

# --- the command tree -----------------------------------------------------------------

Baseline = Mapping[str, "str | bool | Sequence[str]"]


def _walk(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    yield path, command
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from _walk(sub, (*path, name))


COMMANDS = dict(_walk(main))

#: What follows a group's own options when one of them is under test.
GROUP_TAIL: dict[tuple[str, ...], tuple[str, ...]] = {(): ("describe",)}

_PCR = "00" * 48
_NONCE = "0123456789abcdef"

#: Valid values for every command, by parameter name (paths relative to the case's
#: directory, which holds the files of :func:`_template`). A parameter under test
#: takes its values from the first baseline that names it (the first one otherwise).
BASELINES: dict[tuple[str, ...], Sequence[Baseline]] = {
    (): [{"device": "local"}],
    ("cuse",): [{"name": "nsmargv", "state_dir": "state", "ca_dir": "ca", "mode_text": "0600",
                 "group": "0"}],
    ("demo",): [{"output": "demo.cose"}],
    ("describe",): [{"device": "local"}],
    ("pcr",): [{}],
    ("pcr", "get"): [{"index": "16", "device": "local"}],
    ("pcr", "extend"): [{"index": "16", "data_hex": "00", "device": "local"},
                        {"index": "16", "data_file": "data.bin", "device": "local"}],
    ("pcr", "lock"): [{"index": "16", "device": "local"}],
    ("pcr", "lock-range"): [{"range_": "16", "device": "local"}],
    ("random",): [{"device": "local", "count": "16"}],
    ("attest",): [{"device": "local", "output": "out.cose", "nonce": "00", "user_data": "00",
                   "public_key": "@data.bin"},
                  {"device": "local", "output": "out.cose", "user_data": "@data.bin"}],
    ("ca",): [{}],
    ("ca", "init"): [{"directory": "newca"}],
    ("ca", "root"): [{"directory": "ca"}, {"state_dir": "state"}],
    ("eif",): [{}],
    ("eif", "build"): [{"kernel": "kernel", "kernel_config": "kconfig", "cmdline": "console=ttyS0",
                        "ramdisks": ["ramdisk"], "name": "argv", "image_version": "1.0",
                        "metadata": "meta.json", "arch": "x86_64", "memory": "64", "cpus": "1",
                        "build_time": "2026-01-01T00:00:00", "signing_certificate": "cert.pem",
                        "private_key": "key.pem", "output": "out.eif"}],
    ("eif", "describe"): [{"eif_path": "image.eif"}],
    ("eif", "sign"): [{"eif_path": "image.eif", "signing_certificate": "cert.pem",
                       "private_key": "key.pem", "output": "signed.eif"}],
    ("eif", "pcr"): [{"input_path": "data.bin"}, {"signing_certificate": "cert.pem"}],
    ("enclave",): [{}],
    ("enclave", "build-sample"): [{"output": "sample.eif", "name": "sample"}],
    ("enclave", "run"): [{"eif_path": "image.eif", "cpu_count": "1", "memory": "64",
                          "enclave_cid": "5", "enclave_name": "argv", "parent_instance_id": "i-0",
                          "parent_role_arn": "arn:aws:iam::1:role/r", "vsock_socket": "v.sock",
                          "ready_timeout": "1"},
                         {"config": "enclave.json"}],
    ("enclave", "describe"): [{}],
    ("enclave", "console"): [{"enclave_id": "i-0-enc0", "disconnect_timeout": "1"},
                             {"enclave_name": "argv"}],
    ("enclave", "terminate"): [{"enclave_id": "i-0-enc0"}, {"enclave_name": "argv"}],
    ("serve",): [{"socket_path": "s.sock", "state_dir": "newstate", "ca_dir": "ca", "poll_us": "0",
                  "eif": "image.eif", "parent_instance_id": "i-0123456789abcdef0",
                  "parent_role_arn": "arn:aws:iam::1:role/r", "boot_pcrs": [f"5={_PCR}"],
                  "module_id": "argv"}],
    ("state",): [{}],
    ("state", "export"): [{"state_dir": "state", "output": "snap-out.bin"}],
    ("state", "import"): [{"state_dir": "state2", "snapshot": "snap.bin", "ca_dir": "ca"}],
    ("verify",): [{"doc": "doc.cose", "roots": ["root.pem"], "at": "", "pcrs": [f"0={_PCR}"],
                   "nonce": _NONCE, "max_age": "100000000"}],
    ("inspect",): [{"doc": "doc.cose"}],
    ("vm",): [{}],
    ("vm", "setup"): [{"cache_dir": "vmcache", "kernel_package": "linux-image-amd64"}],
    ("vm", "run"): [{"cache_dir": "vmcache", "kernel": "linux-image-amd64", "timeout": "5",
                     "device": "ours", "shares": ["share"], "env": ["A=B"], "memory_mb": "256",
                     "state_dir": "vmstate", "backend_args": ["--ephemeral"], "kernel_args": "quiet",
                     "eif": "image.eif", "parent_instance_id": "i-0123456789abcdef0",
                     "parent_role_arn": "arn:aws:iam::1:role/r", "boot_pcrs": [f"5={_PCR}"],
                     "module_id": "argv", "command": ["true"]}],
    ("vsock",): [{}],
    ("vsock", "serve"): [{"socket_path": "v.sock", "guest_cid": "5", "uds_path": "u.sock",
                          "poll_us": "0"}],
}

#: Commands that run until stopped once they are up (their first line on stdout).
SERVING = {("serve",), ("vsock", "serve"), ("cuse",)}
#: Commands whose set-up would fetch a Linux root or boot QEMU: run unprivileged.
VM_COMMANDS = {("vm", "setup"), ("vm", "run"), ("enclave", "build-sample"), ("enclave", "run")}
#: Exit status of a verdict on the input (not an error): output may be several lines.
VERDICTS = {("verify",): 1, ("inspect",): 1}
#: Exit status of a VM command whose toolchain cannot be set up (here: not root).
VM_SETUP_FAILED = {("vm", "run"): 125}

#: Commands whose valid baseline still fails here: no VM set-up (not root), no
#: /dev/cuse, no running enclave.
REFUSED_BASELINES = {*VM_COMMANDS, ("enclave", "console"), ("enclave", "terminate"),
                     *(() if os.path.exists("/dev/cuse") else (("cuse",),))}

HOSTILE: dict[str, bytes] = {
    "ff": b"\xff",
    "abc80def": b"abc\x80def",
    "empty": b"",
    "100KiB": b"x" * (100 << 10),
}
#: ``python -m virtio_nsm`` for a user who is not root (the argv bytes are the same).
_AS_NOT_ROOT = (b"import os, runpy; os.geteuid = lambda: 65534; "
                b"runpy.run_module('virtio_nsm', run_name='__main__', alter_sys=True)")


def _is_path(param: click.Parameter) -> bool:
    return isinstance(param.type, click.Path)


def _takes_text(param: click.Parameter) -> bool:
    return not (isinstance(param, click.Option) and (param.is_flag or param.count))


def _baseline_for(path: tuple[str, ...], name: str | None) -> Baseline:
    if path not in BASELINES:
        pytest.fail(f"`nsm {' '.join(path)}` has no baseline in BASELINES: add valid values for it")
    choices = BASELINES[path]
    return next((b for b in choices if name in b), choices[0])


def _argv(path: tuple[str, ...], values: Mapping[str, object]) -> list[bytes]:
    """argv (after ``python -m virtio_nsm``) for ``values``: options, then arguments."""
    command = COMMANDS[path]
    options: list[bytes] = []
    arguments: list[bytes] = []
    for param in command.params:
        if param.name not in values:
            continue
        value = values[param.name]
        items = [value] if isinstance(value, (str, bytes, bool)) else list(value)  # type: ignore[call-overload]
        for item in items:
            raw = item if isinstance(item, bytes) else os.fsencode(item) if isinstance(item, str) else b""
            if isinstance(param, click.Argument):
                arguments.append(raw)
            elif item is True:
                options.append(param.opts[0].encode())
            elif item is not False:
                options += [param.opts[0].encode(), raw]
    tail = [t.encode() for t in GROUP_TAIL.get(path, ())] if isinstance(command, click.Group) else []
    return [os.fsencode(p) for p in path] + options + ([b"--"] if arguments else []) + arguments + tail


# --- the files a case needs -------------------------------------------------------


def _certificate() -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "argv test signer")])
    start = dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(start)
            .not_valid_after(start + dt.timedelta(days=30)).sign(key, hashes.SHA384()))
    return (key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()),
            cert.public_bytes(serialization.Encoding.PEM))


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Everything the baselines name: keys, an image, a CA, a state directory, a document."""
    d = tmp_path_factory.mktemp("argv-template")
    (d / "kernel").write_bytes(b"KERNEL")
    (d / "ramdisk").write_bytes(b"RAMDISK")
    (d / "kconfig").write_text("#\n# Automatically generated file; DO NOT EDIT.\n"
                               "# Linux/x86 6.1.0 Kernel Configuration\n")
    (d / "meta.json").write_text('{"a": 1}')
    (d / "data.bin").write_bytes(b"data")
    key_pem, cert_pem = _certificate()
    (d / "key.pem").write_bytes(key_pem)
    (d / "cert.pem").write_bytes(cert_pem)
    build_eif(d / "image.eif", kernel=d / "kernel", cmdline="console=ttyS0", ramdisks=[d / "ramdisk"],
              metadata=None)
    (d / "enclave.json").write_text('{"eif_path": "image.eif"}')
    authority = CertificateAuthority.generate()
    save_ca(authority, d / "ca")
    (d / "root.pem").write_bytes(authority.certificate_pem)
    DurableNsm.open(d / "state", ca=load_ca(d / "ca")).close()
    (d / "snap.bin").write_bytes(export_state(d / "state"))
    with Nsm.local(NsmDevice(ca=authority)) as nsm:
        (d / "doc.cose").write_bytes(nsm.attestation(nonce=bytes.fromhex(_NONCE)))
    (d / "share").mkdir()
    return d


# --- running a case ---------------------------------------------------------------


@dataclass
class Case:
    path: tuple[str, ...]
    param: str | None  # None: the baseline itself, or --help
    kind: str  # a HOSTILE key, "fspath", "baseline" or "help"
    argv: list[bytes] = field(default_factory=list)


@dataclass
class Outcome:
    returncode: int | None
    stdout: str
    stderr: str
    served: bool  # a serving command was up and was stopped
    before: set[bytes]
    after: set[bytes]


def _tree(root: Path) -> set[bytes]:
    out: set[bytes] = set()
    for top, dirs, files in os.walk(os.fsencode(root)):
        for name in (*dirs, *files):
            out.add(os.path.relpath(os.path.join(top, name), os.fsencode(root)))
    return out


def _run(case: Case, directory: Path) -> Outcome:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NSM_", "PYTEST_"))}
    env.update(XDG_DATA_HOME=str(directory / ".xdg-data"), XDG_STATE_HOME=str(directory / ".xdg-state"),
               XDG_RUNTIME_DIR=str(directory / ".xdg-run"), XDG_CACHE_HOME=str(directory / ".xdg-cache"),
               NSM_ENCLAVE_RUN_DIR=str(directory / ".run"), NSM_VM_CACHE=str(directory / ".vmcache"),
               NSM_VM_MIRROR="http://127.0.0.1:9/debian", PYTHONDONTWRITEBYTECODE="1",
               HOME=str(directory / ".home"))
    before = _tree(directory)
    if case.path in VM_COMMANDS:  # as if not root: set-up refuses before it fetches anything
        argv = [os.fsencode(sys.executable), b"-c", _AS_NOT_ROOT, *case.argv]
    else:
        argv = [os.fsencode(sys.executable), b"-m", b"virtio_nsm", *case.argv]
    served = False
    returncode: int | None
    # files, not pipes: a command that writes much to stderr cannot block on us
    with (tempfile.TemporaryFile() as out_file, tempfile.TemporaryFile() as err_file,
          subprocess.Popen(argv, cwd=directory, env=env, stdin=subprocess.DEVNULL, stdout=out_file,
                           stderr=err_file) as proc):
        if case.path in SERVING and case.kind != "help":
            deadline = time.monotonic() + 30
            while proc.poll() is None and time.monotonic() < deadline:
                if b"\n" in _contents(out_file):  # up once it says where
                    served = True
                    break
                time.sleep(0.05)
            returncode = stop_process(proc, timeout=20)
        else:
            try:
                returncode = proc.wait(60)
            except subprocess.TimeoutExpired:
                stop_process(proc)
                returncode = None  # a hang
        out = _contents(out_file).decode("utf-8", "replace")
        err = _contents(err_file).decode("utf-8", "replace")
    return Outcome(returncode, out, err, served, before, _tree(directory))


def _contents(fh: IO[bytes]) -> bytes:
    fh.seek(0)
    return fh.read()


def _prepare(case: Case, template: Path, base: Path) -> Path:
    directory = Path(tempfile.mkdtemp(prefix="c", dir=base))
    for entry in template.iterdir():
        if entry.is_dir():
            shutil.copytree(entry, directory / entry.name)
        else:
            shutil.copy2(entry, directory / entry.name)
    return directory


def _cases() -> list[Case]:
    cases: list[Case] = []
    for path, command in COMMANDS.items():
        cases.append(Case(path, None, "help", [*(p.encode() for p in path), b"--help"]))
        if isinstance(command, click.Group) and path not in GROUP_TAIL:
            continue
        cases.append(Case(path, None, "baseline"))
        for param in command.params:
            if not _takes_text(param):
                continue
            kinds = [*HOSTILE, "fspath"] if _is_path(param) else list(HOSTILE)
            cases += [Case(path, param.name, kind) for kind in kinds]
    return cases


def _hostile_path(value: str) -> str:
    """``value`` with a non-UTF-8 byte in its last component."""
    head, _, name = value.rpartition("/")
    return os.fsdecode(os.fsencode(f"{head}/" if head else "") + b"\xff" + os.fsencode(name))


def _values(case: Case, directory: Path) -> dict[str, object]:
    values: dict[str, object] = dict(_baseline_for(case.path, case.param))
    if case.path == ("verify",):
        values["at"] = dt.datetime.now(dt.UTC).isoformat()
    if case.param is None:
        return values
    if case.kind == "fspath":
        original = values.get(case.param)
        first = original if isinstance(original, str) else (original or ["file"])[0]  # type: ignore[index]
        assert isinstance(first, str)
        hostile = _hostile_path(first)
        source, target = directory / first, directory / hostile
        if source.is_dir():
            shutil.copytree(source, target)
        elif source.exists():
            shutil.copy2(source, target)
        values[case.param] = hostile if isinstance(original, str) else [hostile]
    else:
        raw = HOSTILE[case.kind]
        original = values.get(case.param)
        values[case.param] = [raw] if isinstance(original, list) else raw
    return values


#: Lines that are not the error: click's usage lines, progress, a server's log, the
#: note that the default CA was made (by a command that got that far).
_NOT_ERRORS = re.compile(r"Usage: |Try '|\[nsm |note: |nsm (vsock )?serve: (INFO|DEBUG): |"
                         r"nsm: created the default CA ")


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip() and not _NOT_ERRORS.match(line)]


ALL_CASES = _cases()


@pytest.fixture(scope="module")
def outcomes(template: Path) -> Iterator[dict[tuple[tuple[str, ...], str | None, str], tuple[Case, Outcome]]]:
    """Every case, run a few at a time (most of their time is the interpreter starting)."""
    base = Path(tempfile.mkdtemp(prefix="argv", dir="/tmp"))  # short: AF_UNIX paths
    os.chmod(base, 0o755)
    selected = [c for c in ALL_CASES if _selected(c)]

    def one(case: Case) -> tuple[Case, Outcome]:
        directory = _prepare(case, template, base)
        if case.kind != "help":
            case.argv = _argv(case.path, _values(case, directory))
        return case, _run(case, directory)

    try:
        with ThreadPoolExecutor(max_workers=int(os.environ.get("NSM_ARGV_JOBS", "3"))) as pool:
            results = list(pool.map(one, selected))
        yield {(c.path, c.param, c.kind): (c, o) for c, o in results}
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _selected(case: Case) -> bool:
    only = os.environ.get("NSM_ARGV_ONLY")
    return not only or " ".join(case.path).startswith(only)


def _id(case: Case) -> str:
    return "-".join(("nsm", *case.path, case.param or "", case.kind)).replace("--", "-")


@pytest.mark.parametrize("case", ALL_CASES, ids=_id)
def test_hostile_argv(case: Case, outcomes: dict[tuple[tuple[str, ...], str | None, str],
                                                  tuple[Case, Outcome]]) -> None:
    if not _selected(case):
        pytest.skip("NSM_ARGV_ONLY")
    _, got = outcomes[(case.path, case.param, case.kind)]
    shown = f"nsm {' '.join(case.path)} ({case.param} {case.kind}): rc={got.returncode}\n{got.stderr[-3000:]}"
    assert "Traceback" not in got.stderr, shown
    assert got.returncode is not None, f"{shown}\nstill running after 60 s (or after SIGKILL)"
    if case.kind == "help":
        assert got.returncode == 0 and "Usage:" in got.stdout, shown
        return
    baseline = outcomes.get((case.path, None, "baseline"))
    if case.kind == "baseline":
        if case.path not in REFUSED_BASELINES:
            assert got.returncode == 0 or got.served, shown  # the baselines are valid
        return
    if got.served:
        assert got.returncode == 0, shown  # SIGTERM ends a server cleanly
        return
    if got.returncode == 0:
        return
    if case.kind == "fspath":
        # a legal path that exists does what the baseline does
        assert baseline is not None
        base_rc = baseline[1].returncode
        assert got.returncode == base_rc, shown
        return
    if VERDICTS.get(case.path) == got.returncode:
        return
    lines = _error_lines(got.stderr)
    if baseline is not None and baseline[1].returncode == got.returncode and lines[-1:] == _error_lines(
            baseline[1].stderr)[-1:]:
        return  # accepted: it got as far as the baseline (no VM here, no enclave to find)
    assert len(lines) == 1, shown
    # the lock file a state directory keeps (here: one given as "" is the case's directory)
    created = {p for p in got.after - got.before if not p.startswith((b".xdg", b".run", b".home", b".vmcache"))
               and not (p == b"lock" and case.param == "state_dir")}
    assert not created, f"{shown}\nleft behind: {sorted(created)}"
