"""Which dtype the matmuls run in: bf16 where the device computes it natively, else fp32 (or fp16 on old GPUs).

Training and evaluation both choose it, so it lives here, beside the model loader, below both.
Autocast runs each matmul in the chosen dtype while the weights stay as they are; fp16's small
range also needs the loss scaled (``torch.amp.GradScaler``), bf16's does not.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Precision:
    """How the forward pass runs: the autocast dtype, or None for plain fp32."""

    dtype: torch.dtype | None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]

    @property
    def base_dtype(self) -> torch.dtype:
        """The dtype to hold a frozen base in: the compute dtype itself, fp32 for fp32.

        Autocast would cast a frozen fp32 weight to the compute dtype at every matmul, forward
        and backward, the same weight every step; held in that dtype it is cast once, at load.
        Only what trains (LoRA's A and B, and AdamW's state) needs fp32 (``lora.inject_lora``'s
        ``adapter_dtype``), as QLoRA, torchtune and peft (``autocast_adapter_dtype``) do.
        """
        return self.dtype or torch.float32

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16 only: its gradients underflow unless the loss is scaled up first."""
        return self.dtype == torch.float16

    def autocast(self, device: torch.device):
        """A context in which ``device``'s matmuls run in ``dtype`` (nothing changes for fp32)."""
        return nullcontext() if self.dtype is None else torch.autocast(device.type, dtype=self.dtype)


FP32 = Precision(None)


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast is fast."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_precision(requested: str, device: torch.device) -> Precision:
    """``auto``: bf16 where the device computes it natively, fp16 on older GPUs, else fp32.

    Raises:
        ValueError: ``requested`` is not one of ``PRECISIONS``, or fp16 without a CUDA device.
    """
    if requested not in PRECISIONS:
        raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}")
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "bf16" if cpu_supports_bf16() else "fp32"
    if requested == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
    return Precision({"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[requested])
