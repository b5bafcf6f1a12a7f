"""The dtype a matmul computes in: autocast's where autocast is on, else its input's.

A layer that writes its own autograd function (the fused LoRA path, the 4-bit base, the chunked
loss) must cast its inputs to that dtype itself: autocast changes only the operations it sees,
and inside ``torch.autograd.Function.forward`` the casts it would make are the function's job.
"""

import torch


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the plain path would compute in: autocast's where it is on for ``x``'s device, else ``x``'s."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype
