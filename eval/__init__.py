"""vlmprune's evaluation harness (run from the repository as ``python -m eval ...``; not part of the wheel)."""
