"""Pref-GRPO in JAX/Flax: pairwise-preference GRPO for text-to-image flow models."""

__version__ = "0.1.0"
