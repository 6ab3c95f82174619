"""Data-free distillation of a ternary FLUX student (`python -m train.distill`, see the README)."""
