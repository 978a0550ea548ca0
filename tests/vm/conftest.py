"""The real-kernel tier boots guests: only when asked (``-m vm`` or ``NSM_VM_TESTS=1``)."""

from __future__ import annotations

import os

import pytest


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
