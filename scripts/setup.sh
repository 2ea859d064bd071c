#!/usr/bin/env bash
# Create (or reuse) a virtual environment with vlmprune, its dev tools, the eval extra (demo, benchmarks) and the
# examples extra (notebook execution), offline except for package registries. The CPU build of torch is installed
# FIRST and pinned: an open-ended torch requirement on a fresh venv would pull a multi-GB CUDA build.
#   VENV            where the venv lives (default: .venv in the repository)
#   TRANSFORMERS    the transformers requirement to install (default: the newest tested release)
#   TORCH           the torch requirement (default: torch==2.13.0, the CPU wheel available offline here)
#   LMMS=1          also install the lmms extra (lmms-eval, for the plugin). lmms-eval requires torchvision, and pip
#                   would otherwise pick the newest one, which pins a newer torch and pulls a multi-GB CUDA build:
#                   torchvision is pinned to the release that matches the installed torch, and uninstalled again
#                   when it does not import (PyPI's torchvision is a CUDA build that fails beside the CPU torch;
#                   transformers then uses its PIL image processors). filelock<4: lmms-eval 0.7.3 imports
#                   filelock._api, gone in filelock 4. timm (an lmms-eval requirement) imports torchvision: where
#                   torchvision was removed, timm goes too -- a timm that cannot import breaks the `accelerate`
#                   command (its CLI imports timm whenever it is installed), which multi-process runs use.
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
if [ "${LMMS:-0}" = "1" ]; then
  tv=$("$VENV/bin/python" -W ignore -c "import torch; v = torch.__version__.split('+')[0].split('.'); print(f'0.{int(v[1]) + 15}.{v[2]}')")
  "${PIP[@]}" "$TORCH" "$TRANSFORMERS" "torchvision==$tv" "filelock<4" -e ".[dev,eval,examples,lmms]"
  if ! "$VENV/bin/python" -c "import torchvision" >/dev/null 2>&1; then
    "$VENV/bin/python" -m pip uninstall --quiet --yes torchvision
    if ! "$VENV/bin/python" -c "import timm" >/dev/null 2>&1; then
      "$VENV/bin/python" -m pip uninstall --quiet --yes timm
    fi
  fi
else
  "${PIP[@]}" "$TORCH" "$TRANSFORMERS" -e ".[dev,eval,examples]"
fi
"$VENV/bin/python" -c "import torch, transformers, vlmprune; print('vlmprune', vlmprune.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
