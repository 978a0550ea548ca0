#!/usr/bin/env bash
# The real-kernel tier (issue 5), for CI and by hand: builds the VM toolchain cache
# when it is missing (a fresh machine: ~40 s, a few hundred MB from Debian's archive),
# then boots the test guests. Needs root. Extra arguments go to pytest.
#   bash tests/vm/tier.sh            # uses .venv/bin/python if present, else python3
# Environment: NSM_VM_CACHE (cache dir), NSM_VM_BACKEND_CMD (backend override).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
t0=$(date +%s)
echo "== nsm vm setup"
"$PY" -m virtio_nsm vm setup
t1=$(date +%s)
echo "== pytest -m vm tests/vm (setup took $((t1 - t0)) s)"
"$PY" -m pytest -m vm tests/vm "$@"
echo "== vm tier took $(( $(date +%s) - t0 )) s"
