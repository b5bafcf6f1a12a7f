"""Experiments about what LoRA learns, run with the training loop: rank and alpha, and the shape of ΔW."""
