"""README.md cannot drift: every shell command in it runs as written (see readme_support).

VM blocks run in the VM tier (tests/vm/test_readme_vm.py); skipped blocks must give a
reason and still name only real ``nsm`` commands and repository paths.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from readme_support import (
    COMMAND_WORDS,
    KINDS,
    REPO,
    SHELL_LANGS,
    Walk,
    blocks,
    command_lines,
    dangling_marks,
    named_paths,
    nsm_command_exists,
)


def test_every_shell_block_is_tagged_and_every_marker_is_known() -> None:
    problems = []
    for b in blocks():
        if b.lang not in SHELL_LANGS:
            for line in b.text.splitlines():
                if COMMAND_WORDS.match(line):
                    problems.append(f"{b.where()}: shell commands in a ```{b.lang or ''} block "
                                    f"(tag it ```sh so that it is checked): {line.strip()}")
                    break
            if b.kind != "run":
                problems.append(f"{b.where()}: a readme-test marker on a non-shell block")
        elif b.kind != "run" and b.kind not in KINDS:
            problems.append(f"{b.where()}: unknown marker readme-test: {b.kind} "
                            f"(use skip REASON or vm)")
        elif b.kind == "skip" and not b.reason:
            problems.append(f"{b.where()}: readme-test: skip needs a reason")
    problems += [f"README.md:{n}: readme-test marker not followed by a fence"
                 for n in dangling_marks()]
    assert not problems, "\n".join(problems)


def test_blocks_not_run_here_name_real_commands_and_paths() -> None:
    problems = []
    for b in blocks():
        if b.lang not in SHELL_LANGS or b.kind == "run":
            continue
        for line in command_lines(b):
            for segment in line.replace("&&", ";").replace("|", ";").split(";"):
                try:
                    words = shlex.split(segment)
                except ValueError:
                    words = segment.split()
                words = [w for w in words if not w.startswith("<")]
                if words and words[0] in ("nsm", ".venv/bin/nsm"):
                    why = nsm_command_exists(words[1:])
                    if why:
                        problems.append(f"{b.where()}: {why}: {segment.strip()}")
            for path in named_paths(line):
                if not (REPO / path).exists():
                    problems.append(f"{b.where()}: no {path} in the repository")
    assert not problems, "\n".join(problems)


def test_the_walker_reads_markers_and_commands() -> None:
    text = (
        "intro\n\n<!-- readme-test: skip long: demo -->\n```sh\nnsm describe  # a comment\n```\n"
        "```\n-object memory\n```\n"
        "<!-- readme-test: vm -->\n\n```bash\nnsm vm run \\\n    -- nsm describe\n```\n"
        "<!-- readme-test: skip -->\ntext\n"
    )
    found = blocks(text)
    assert [(b.line, b.lang, b.kind, b.reason) for b in found] == [
        (4, "sh", "skip", "long: demo"), (7, "", "run", ""), (12, "bash", "vm", "")]
    assert command_lines(found[0]) == ["nsm describe"]
    assert command_lines(found[2]) == ["nsm vm run      -- nsm describe"]
    assert dangling_marks(text) == [16]
    assert nsm_command_exists(["--device", "local", "pcr", "get", "1"]) is None
    assert nsm_command_exists(["pcr", "nope"]) is not None
    assert named_paths(".venv/bin/python bench/bench_device.py; cat $X/tests/x") == [
        "bench/bench_device.py"]


def _guarded_home_paths() -> list[Path]:
    home = Path(os.path.expanduser("~"))
    return [home / ".local" / "state" / "virtio-nsm", home / ".local" / "share" / "virtio-nsm"]


def _stamp(paths: list[Path]) -> list[tuple[str, float | None]]:
    out = []
    for p in paths:
        try:
            out.append((str(p), p.stat().st_mtime))
        except OSError:
            out.append((str(p), None))
    return out


def test_readme_shell_blocks_run_as_written(tmp_path: Path) -> None:
    """Every unmarked shell block, in order, in a fresh home; nothing left running."""
    runnable = [b for b in blocks() if b.lang in SHELL_LANGS and b.kind == "run"]
    assert runnable, "README.md has no runnable shell block?"
    guarded = _guarded_home_paths()
    before = _stamp(guarded)
    socket_before = Path("/tmp/nsm.sock").exists()
    walk = Walk(tmp_path)
    failures = []
    for b in runnable:
        status, out, left = walk.run(b)
        if status != 0:
            failures.append(f"{b.where()} exited {status}:\n{b.text}\n--- output:\n{out}")
        if left:
            failures.append(f"{b.where()} left processes running: {left}")
    assert not failures, "\n\n".join(failures)
    assert _stamp(guarded) == before, "the README walk touched the real home directory"
    if not socket_before:
        assert not Path("/tmp/nsm.sock").exists(), "a README block left /tmp/nsm.sock behind"
