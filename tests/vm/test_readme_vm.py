"""The README's VM blocks (``<!-- readme-test: vm -->``) run as written, in a fresh home.

Host side of the real-kernel tier: the unit suite runs every other README block
(tests/test_readme.py); these boot guests, so they run here. The VM cache is the
tier's (a fresh home would have to rebuild it).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from readme_support import SHELL_LANGS, Walk, blocks

from virtio_nsm.vm.setup import Toolchain, default_cache_dir, load_or_setup

pytestmark = pytest.mark.vm


@pytest.fixture(scope="module")
def toolchain() -> Toolchain:
    return load_or_setup()


def test_readme_vm_blocks_run_as_written(toolchain: Toolchain, tmp_path: Path) -> None:
    vm_blocks = [b for b in blocks() if b.lang in SHELL_LANGS and b.kind == "vm"]
    assert vm_blocks, "README.md has no readme-test: vm block"
    walk = Walk(tmp_path, extra_env={"NSM_VM_CACHE": str(default_cache_dir())})
    failures = []
    for b in vm_blocks:
        status, out, left = walk.run(b, timeout=1200)
        if status != 0:
            failures.append(f"{b.where()} exited {status}:\n{b.text}\n--- output:\n{out}")
        if left:
            failures.append(f"{b.where()} left processes running: {left}")
    assert not failures, "\n\n".join(failures)
