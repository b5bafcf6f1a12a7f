"""Training: models, data pipelines and the raw PyTorch training loop (`python -m training.loop`)."""
