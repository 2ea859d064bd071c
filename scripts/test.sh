#!/usr/bin/env bash
# The README's second command: set up (if needed), lint, and run the fast test suite on the newest tested
# transformers, then a smoke run on the oldest supported one. Fails if pytest collects no tests.
#   SKIP_OLDEST=1   skip the run on the oldest supported transformers
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/ruff check .
run_pytest() {
  local py=$1; shift
  set +e
  "$py" -m pytest "$@"
  local rc=$?
  set -e
  if [ "$rc" -eq 5 ]; then echo "pytest collected no tests: failing" >&2; exit 1; fi
  return "$rc"
}
run_pytest .venv/bin/python -q tests
echo "--- a non-editable install (pip install .) imports every adapter"
tmp=$(mktemp -d); root=$(pwd)
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --target "$tmp" .
(cd "$tmp" && PYTHONPATH="$tmp" "$root/.venv/bin/python" -c "
import importlib, vlmprune
assert vlmprune.__file__.startswith('$tmp'), vlmprune.__file__
from vlmprune.patches import ADAPTERS
for name in vlmprune.list_supported_models():
    ADAPTERS.get(name)
print('wheel ok:', vlmprune.list_supported_models())")
rm -rf "$tmp"
if [ "${SKIP_OLDEST:-0}" != "1" ]; then
  echo "--- oldest supported transformers (5.0.0): conformance, API and extension suites"
  VENV=.venv-tf5.0 TRANSFORMERS=transformers==5.0.0 bash scripts/setup.sh
  run_pytest .venv-tf5.0/bin/python -q tests/test_conformance.py tests/test_api.py tests/test_extension.py
fi
