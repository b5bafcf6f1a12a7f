"""Training: the raw PyTorch loop (`python -m training.loop`), its settings, schedule and checkpoints."""
