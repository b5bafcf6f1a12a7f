"""Evaluation mode for a block, and the caller's mode back afterwards."""

from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(model: nn.Module):
    """``model.eval()`` inside the block (no dropout); on exit the train/eval mode it had, even after an error.

    Evaluating in the middle of training must not leave the model in eval mode, and evaluating
    a model the caller put in eval mode must not switch it to training.
    """
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
