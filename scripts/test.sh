#!/usr/bin/env bash
# The README's second command: set up (if needed), lint, and run the test suite on every transformers release
# in vlmprune/tested_versions.txt (newest in .venv, the others in throwaway .venv-tf<version>). Fails if pytest
# collects no tests.
#   ONLY_NEWEST=1   test the newest release only (quick local runs)
#   SKIP_LMMS=1     skip the lmms-eval plugin's end-to-end tests (their venv, .venv-lmms, takes ~3 min to build)
#   KEEP_VENVS=1    keep .venv-lmms and .venv-tf<version> after their stage (default: delete each one as soon as its
#                   tests ran -- together they take ~6 GB, more than a small CI disk has; see issue #5's notes)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
export PIP_NO_CACHE_DIR=1  # a wheel cache only doubles the disk a fresh machine needs
drop_venv() {
  if [ "${KEEP_VENVS:-0}" != "1" ]; then rm -rf "$1"; fi
}
export VLMPRUNE_REQUIRE_EXAMPLES=1  # setup.sh installs the examples extra: the notebooks must run, not skip
mapfile -t versions < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' vlmprune/tested_versions.txt | sort -V)
newest=${versions[-1]}
TRANSFORMERS="transformers==$newest" bash scripts/setup.sh
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
echo "--- transformers $newest (newest tested)"
run_pytest .venv/bin/python -q tests
echo "--- a non-editable install (pip install .) imports every adapter"
tmp=$(mktemp -d)
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation --target "$tmp" .
(cd "$tmp" && PYTHONPATH="$tmp" "$root/.venv/bin/python" -c "
import vlmprune
assert vlmprune.__file__.startswith('$tmp'), vlmprune.__file__
from vlmprune.patches import ADAPTERS
for name in vlmprune.list_supported_models():
    ADAPTERS.get(name)
print('wheel ok:', vlmprune.list_supported_models())")
rm -rf "$tmp"
if [ "${SKIP_LMMS:-0}" != "1" ]; then
  echo "--- lmms-eval plugin, end to end (transformers $newest, the lmms extra in .venv-lmms)"
  VENV=.venv-lmms LMMS=1 TRANSFORMERS="transformers==$newest" bash scripts/setup.sh
  VLMPRUNE_REQUIRE_LMMS=1 run_pytest .venv-lmms/bin/python -q tests/test_lmms_eval.py tests/test_examples.py -k "lmms"
  drop_venv .venv-lmms
fi
if [ "${ONLY_NEWEST:-0}" != "1" ]; then
  for v in "${versions[@]}"; do
    [ "$v" = "$newest" ] && continue
    echo "--- transformers $v"
    VENV=".venv-tf$v" TRANSFORMERS="transformers==$v" bash scripts/setup.sh
    run_pytest ".venv-tf$v/bin/python" -q tests
    drop_venv ".venv-tf$v"
  done
fi
