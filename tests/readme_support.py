"""Walking README.md: its fenced shell blocks, how each is marked, and running them.

Convention (written in README.md itself, an HTML comment on the line before a fence):

* no comment: the block runs, as written, in the unit suite (``tests/test_readme.py``);
* ``<!-- readme-test: vm -->``: it boots guests; it runs in the VM tier
  (``tests/vm/test_readme_vm.py``);
* ``<!-- readme-test: skip REASON -->``: it is not run (long-running, destructive, or a
  synopsis with placeholders); REASON is required, and every ``nsm`` command and
  every repository path it names must still exist.

Blocks run one after another in one private working directory (a reader going down
the README: files made by one block are there for the next), with ``HOME`` a private
directory, no ``XDG_*``/``NSM_*`` variables, ``nsm`` and ``.venv/bin/python`` running
this tree's code, under ``bash -e -o pipefail``. A block may start background jobs
but must stop them: anything still running when it ends fails the walk.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHELL_LANGS = frozenset({"sh", "bash", "shell", "console"})
MARK = re.compile(r"<!--\s*readme-test:\s*(?P<kind>\S+)\s*(?P<reason>.*?)\s*-->")
KINDS = frozenset({"skip", "vm"})
#: Words that start a shell command line: a block holding one must be tagged ```sh.
COMMAND_WORDS = re.compile(
    r"^\s*(\$ )?(nsm|\./run|\.venv/bin/\S+|python3?|sudo|bash|sh|export|rm|mkdir|openssl|"
    r"pip|git|cd|[A-Z_]+=\S*\s+\S+)(\s|$)")
#: Entries of the repository that the walk's working directory links to.
REPO_ENTRIES = ("README.md", "pyproject.toml", "run", "src", "tests", "bench", "docs")
BLOCK_TIMEOUT = 300.0


@dataclass(frozen=True)
class Block:
    line: int  # of the opening fence, 1-based
    lang: str
    text: str
    kind: str  # "run", "skip", "vm" or an unknown marker (an error)
    reason: str

    def where(self) -> str:
        return f"README.md:{self.line}"


def blocks(text: str | None = None) -> list[Block]:
    """Every fenced block, with the marker of the nearest non-blank line before it."""
    lines = (README.read_text() if text is None else text).splitlines()
    found: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(`{3,}|~{3,})\s*([\w+-]*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang, start = m.group(1), m.group(2).lower(), i
        j = i + 1
        while j < len(lines) and not lines[j].startswith(fence):
            j += 1
        body = "\n".join(lines[start + 1:j])
        k = start - 1
        while k >= 0 and not lines[k].strip():
            k -= 1
        mark = MARK.fullmatch(lines[k].strip()) if k >= 0 else None
        kind, reason = ("run", "") if mark is None else (mark.group("kind"), mark.group("reason"))
        found.append(Block(start + 1, lang, body, kind, reason))
        i = j + 1
    return found


def dangling_marks(text: str | None = None) -> list[int]:
    """Lines of markers that are not followed (blank lines aside) by a fence."""
    lines = (README.read_text() if text is None else text).splitlines()
    bad = []
    for n, line in enumerate(lines):
        if MARK.fullmatch(line.strip()):
            k = n + 1
            while k < len(lines) and not lines[k].strip():
                k += 1
            if k >= len(lines) or not re.match(r"^(`{3,}|~{3,})", lines[k]):
                bad.append(n + 1)
    return bad


def command_lines(block: Block) -> list[str]:
    """The block's command lines: continuations joined, comments and prompts removed."""
    out: list[str] = []
    pending = ""
    for raw in block.text.splitlines():
        line = raw[2:] if block.lang == "console" and raw.startswith("$ ") else raw
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        line = pending + line
        pending = ""
        code = line.split(" #", 1)[0].strip() if not line.lstrip().startswith("#") else ""
        if code:
            out.append(code)
    return out


class Walk:
    """A private home and working directory in which README blocks run."""

    def __init__(self, root: Path, extra_env: dict[str, str] | None = None) -> None:
        self.home = root / "home"
        self.work = root / "work"
        self.home.mkdir(parents=True)
        self.work.mkdir(parents=True)
        for name in REPO_ENTRIES:
            if (REPO / name).exists():
                (self.work / name).symlink_to(REPO / name)
        bindir = self.work / ".venv" / "bin"
        bindir.mkdir(parents=True)
        py = shlex.quote(sys.executable)
        for name, script in (("python", f'exec {py} "$@"'),
                             ("nsm", f'exec {py} -m virtio_nsm "$@"')):
            (bindir / name).write_text(f"#!/bin/sh\n{script}\n")
            (bindir / name).chmod(0o755)
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("XDG_", "NSM_", "PYTEST_", "VIRTUAL_ENV"))}
        env.update(HOME=str(self.home), PYTHONPATH=str(REPO / "src"),
                   PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}", PYTHONDONTWRITEBYTECODE="1")
        env.update(extra_env or {})
        self.env = env

    def run(self, block: Block, timeout: float = BLOCK_TIMEOUT) -> tuple[int, str, list[str]]:
        """Run ``block``; its status, output, and what it left running (then stopped)."""
        script = "\n".join(command_lines(block)) if block.lang == "console" else block.text
        proc = subprocess.Popen(["bash", "-e", "-o", "pipefail", "-c", script], cwd=self.work,
                                env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
            return -1, out.decode(errors="replace") + f"\n(timed out after {timeout:.0f} s)", []
        return proc.returncode, out.decode(errors="replace"), self._stop_group(proc.pid)

    @classmethod
    def _stop_group(cls, pgid: int, grace: float = 3.0) -> list[str]:
        deadline = time.monotonic() + grace  # a process told to stop may take a moment
        left = cls._members(pgid)
        while left and time.monotonic() < deadline:
            time.sleep(0.1)
            left = cls._members(pgid)
        if left:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(pgid, sig)
                except OSError:
                    break
                time.sleep(1)
        return left

    @staticmethod
    def _members(pgid: int) -> list[str]:
        left = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            try:
                if os.getpgid(int(entry)) == pgid:
                    cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
                    stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
                    if stat[0] != "Z":
                        left.append(cmd.decode(errors="replace").strip())
            except (OSError, IndexError):
                continue
        return left


def nsm_command_exists(words: list[str]) -> str | None:
    """None if ``nsm WORDS...`` names a real command (options ignored), else why not."""
    import click

    from virtio_nsm.cli import main

    cmd: click.Command = main
    rest = list(words)
    while rest and rest[0].startswith("-"):  # group options: --device DEV
        rest = rest[2:] if rest[0] == "--device" else rest[1:]
    while isinstance(cmd, click.Group) and rest:
        name = rest.pop(0)
        sub = cmd.commands.get(name)
        if sub is None:
            return f"`nsm` has no command {name!r} under {cmd.name!r}"
        cmd = sub
    return None


def named_paths(line: str) -> list[str]:
    """Repository paths a command line names (bench/..., tests/..., src/..., docs/...)."""
    return re.findall(r"(?<![\w/.$-])((?:bench|tests|src|docs)/[\w./-]*\w)", line)
