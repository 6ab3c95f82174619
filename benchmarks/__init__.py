"""Comparisons with PyTorch (diffusers), run from the repository: `python -m benchmarks.NAME`. Not part of
the installed packages, which never import torch; they need the test extra."""
