#!/usr/bin/env bash
# Create (or reuse) a virtual environment with vlmprune, its dev tools, the eval extra (demo, benchmarks) and the
# examples extra (notebook execution), offline except for package registries. The CPU build of torch is installed
# FIRST and pinned: an open-ended torch requirement on a fresh venv would pull a multi-GB CUDA build.
#   VENV            where the venv lives (default: .venv in the repository)
#   TRANSFORMERS    the transformers requirement to install (default: the newest tested release)
#   TORCH           the torch requirement (default: torch==2.13.0, the CPU wheel available offline here)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
TRANSFORMERS=${TRANSFORMERS:-transformers==$(sed -e "s/#.*//" -e "/^[[:space:]]*$/d" vlmprune/tested_versions.txt | sort -V | tail -n 1)}
TORCH=${TORCH:-torch==2.13.0}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)
"${PIP[@]}" "$TORCH"
"${PIP[@]}" "$TORCH" "$TRANSFORMERS" -e ".[dev,eval,examples]"
"$VENV/bin/python" -c "import torch, transformers, vlmprune; print('vlmprune', vlmprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
