"""``python -m eval <command>``: demo | run | report | bench-prefill | train | card."""

from __future__ import annotations

import sys

COMMANDS = {
    "demo": "eval.demo:main",
    "bench-prefill": "eval.bench_prefill:main",
    "train": "eval.train_tiny:main",
    "card": "eval.card:main",
    "run": "eval.run:main",
    "report": "eval.report:main",
}


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        print(f"usage: python -m eval {{{'|'.join(COMMANDS)}}} [options]   (each takes --help)")
        sys.exit(2)
    import importlib

    module, _, fn = COMMANDS[sys.argv[1]].partition(":")
    getattr(importlib.import_module(module), fn)(sys.argv[2:])


if __name__ == "__main__":
    main()
