"""The learning-rate schedule: a linear warm-up, then a cosine decay to a floor.

    lr(step) = lr_max * (step + 1) / (warmup + 1)                         for step < warmup
    lr(step) = lr_min + (lr_max - lr_min) * (1 + cos(pi * progress)) / 2  after; progress goes
                                                                          from 0 (step = warmup)
                                                                          to 1 (the last step)

Steps count from 0; the first step already moves (a step at lr 0 would be wasted).
The warm-up keeps the first updates small while AdamW's moment estimates are still noisy;
the cosine spends most steps near the peak and slows down smoothly at the end.
"""

import math


def get_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The learning rate for optimizer step ``step`` (counted from 0) of ``max_steps``."""
    if step < warmup_steps:
        return lr * (step + 1) / (warmup_steps + 1)
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - 1 - warmup_steps))
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
