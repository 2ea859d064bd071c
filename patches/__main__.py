"""``python -m vlmprune.patches``: print the supported-models table (README.md embeds it)."""

from . import supported_models_table

print(supported_models_table(), end="")
