"""The real-kernel tier boots guests: only when asked (``-m vm`` or ``NSM_VM_TESTS=1``)."""

from __future__ import annotations

import os

import pytest

# The guest-side module runs only inside `nsm vm run` (the tier passes its path
# explicitly there); on the host it is not even collected.
collect_ignore = [] if os.environ.get("NSM_VM_GUEST") == "1" else ["guest"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "nsm_ko: a guest test of Linux's nsm.ko itself (virtio binding, hwrng, reset); "
        "deselected when the suite runs against a CUSE device")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.environ.get("NSM_VM_GUEST") == "1":
        return  # inside a guest: the guest module decides for itself
    markexpr = config.getoption("markexpr", default="") or ""
    if "vm" in markexpr.replace("not vm", "") or os.environ.get("NSM_VM_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="boots VMs: run with `pytest -m vm tests/vm`")
    for item in items:
        if item.get_closest_marker("vm") is not None:
            item.add_marker(skip)
