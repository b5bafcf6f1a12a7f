"""4-bit NormalFloat (NF4) quantization, written from scratch: the frozen base of QLoRA.

QLoRA (Dettmers et al., 2023) keeps the frozen pretrained weights in 4 bits and trains LoRA
on top in 16 or 32. Three ideas make 4 bits enough:

1. A code book of 16 values at quantiles of the standard normal, scaled to [-1, 1], with an
   exact zero: pretrained weights are roughly normal, so each code is about equally likely.
2. Blockwise absmax scaling: each block of 64 consecutive weights is divided by its largest
   ``|w|`` (its *absmax*), so the block lies in [-1, 1], and each weight is stored as the index
   of its nearest code, 4 bits, two per byte. One outlier then spoils only its own block.
3. Double quantization: the absmax constants (a float32 per 64 weights, 0.5 bit per weight)
   are quantized too, to 8-bit floats in blocks of 256 after subtracting their mean:
   ``8 / 64 + 32 / (64 * 256)`` = 0.127 bit per weight instead of 0.5. Here the 8-bit float is
   PyTorch's ``float8_e4m3fn``; bitsandbytes uses a code book of its own ("dynamic" 8-bit), so
   double-quantized constants agree with its to within 8-bit rounding, not bit for bit.

Storage per weight: 4.5 bits, or about 4.127 with double quantization, against 16 for bf16.

``NF4Linear`` holds what it stores as frozen parameters, not buffers, so that FSDP2 shards the
4-bit base across processes (it shards parameters and replicates buffers), and it holds the
8-bit floats as their bytes (uint8), which the gloo backend can send and which a mixed-precision
policy, casting floating-point parameters only, leaves as they are. ``model.to(dtype)`` and
``model.half()`` cast its bias but leave what it stores in its own dtype (``NF4Linear._apply``).
"""

import warnings

import torch
from torch import nn
from torch.nn import functional as F

from lora.compute_dtype import compute_dtype

# The code book's outermost quantile: halfway between where the last of 15 and of 16 evenly
# spaced probability bins puts its centre, 1 - 1/(2*15) and 1 - 1/(2*16) (QLoRA, appendix E;
# bitsandbytes' create_normal_map uses the same 0.9677).
NF4_OFFSET = 1 - (1 / 30 + 1 / 32) / 2
DOUBLE_QUANT_BLOCK = 256
FLOAT8 = torch.float8_e4m3fn  # the 8-bit float the absmax constants are stored in; largest value 448


def nf4_code_book() -> torch.Tensor:
    """The 16 NF4 values, ascending, from -1 to 1 with an exact 0: normal quantiles, normalised.

    Asymmetric on purpose: 8 positive values and 7 negative ones, so that 0 is a code (zero
    weights, and padding, are stored exactly) while all 16 codes are still used.
    """
    positive = torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 9, dtype=torch.float64)[:-1])  # 8 quantiles > 0
    negative = -torch.special.ndtri(torch.linspace(NF4_OFFSET, 0.5, 8, dtype=torch.float64)[:-1])  # 7 quantiles < 0
    values = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]).sort().values
    return (values / values.max()).float()


NF4 = nf4_code_book()


def quantize_blocks(values: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``values`` flattened and zero-padded to whole blocks, ``(blocks, block_size)``, and each block's absmax."""
    flat = values.detach().float().flatten()
    flat = F.pad(flat, (0, -flat.numel() % block_size))
    blocks = flat.view(-1, block_size)
    return blocks, blocks.abs().amax(dim=1)


def quantize_nf4(weight: torch.Tensor, block_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4 codes of ``weight``, two per byte, and the absmax of each block.

    Shapes: any ``weight`` -> ``codes (ceil(numel / block_size) * block_size / 2,)`` uint8, high
    nibble first, and ``absmax (ceil(numel / block_size),)`` float32. The weight is flattened
    row-major and zero-padded to whole blocks.
    """
    if block_size <= 0 or block_size % 2:
        raise ValueError(f"block_size must be a positive even number (two codes per byte), got {block_size}")
    blocks, absmax = quantize_blocks(weight, block_size)
    # Each block scaled into [-1, 1]; an all-zero block stays 0 (its absmax, 0, is clamped, not divided by).
    scaled = blocks / absmax.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    code_book = NF4.to(weight.device)
    # The nearest code: the number of midpoints between neighbouring codes that lie below the value.
    codes = torch.bucketize(scaled, (code_book[1:] + code_book[:-1]) / 2).to(torch.uint8).flatten()
    return codes[0::2] << 4 | codes[1::2], absmax


def dequantize_nf4(codes: torch.Tensor, absmax: torch.Tensor, shape: torch.Size, block_size: int = 64,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``quantize_nf4`` stored, ``code_book[code] * absmax`` of its block, in ``shape`` and ``dtype``."""
    indices = torch.stack([codes >> 4, codes & 0x0F], dim=-1).flatten().long()
    blocks = NF4.to(codes.device)[indices].view(-1, block_size) * absmax[:, None]
    return blocks.flatten()[: shape.numel()].view(shape).to(dtype)


def quantize_absmax(absmax: torch.Tensor, block_size: int = DOUBLE_QUANT_BLOCK):
    """Double quantization: ``absmax`` as 8-bit floats in blocks, after subtracting the mean.

    Returns ``(codes float8 (blocks * block_size,), scales float32 (blocks,), mean float32 ())``.
    The absmax constants are all positive and bunched together; centred, they use the 8-bit
    float's sign and its range around zero, where its values are densest.
    """
    mean = absmax.mean()
    blocks, block_max = quantize_blocks(absmax - mean, block_size)
    scales = block_max.clamp(min=torch.finfo(torch.float32).tiny) / torch.finfo(FLOAT8).max
    return (blocks / scales[:, None]).to(FLOAT8).flatten(), scales, mean


def dequantize_absmax(codes: torch.Tensor, scales: torch.Tensor, mean: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` absmax constants ``quantize_absmax`` stored, float32; ``codes`` float8, as it returned them."""
    return (codes.float().view(scales.numel(), -1) * scales[:, None]).flatten()[:count] + mean


def frozen(tensor: torch.Tensor) -> nn.Parameter:
    """``tensor`` as a parameter that never trains; ``requires_grad`` must be False for an integer tensor."""
    return nn.Parameter(tensor, requires_grad=False)


class DequantizedLinear(torch.autograd.Function):
    """``x W^T + b`` for a 4-bit ``W``: dequantized for the forward, and again for the backward.

    Autograd would keep the dequantized W (as large as a 16-bit weight) alive from the forward to
    the backward to compute the input gradient; dequantizing twice keeps only the 4-bit codes.
    W and b are frozen: they get no gradient.
    """

    @staticmethod
    def forward(ctx, x, layer: "NF4Linear"):
        dtype = compute_dtype(x)
        ctx.layer, ctx.dtype = layer, dtype
        bias = layer.bias.to(dtype) if layer.bias is not None else None
        return F.linear(x.to(dtype), layer.dequantize(dtype), bias)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out.to(ctx.dtype) @ ctx.layer.dequantize(ctx.dtype), None


class NF4Linear(nn.Module):
    """A frozen ``nn.Linear`` stored in 4-bit NF4: ``x W^T + b`` with ``W`` dequantized per forward.

    Shapes: ``(..., in_features) -> (..., out_features)``. The bias stays in its dtype; it is
    ``out_features`` numbers, not worth quantizing.

    Where ``LoRALinear`` needs the frozen weight, it asks ``base_layer.weight`` (``lora.layer.LinearBase``);
    here ``weight`` is this layer itself, whose ``shape``, ``dtype`` (the original weight's, which
    ``dequantize`` returns), ``device`` and ``add_(delta)`` answer as ``nn.Linear.weight`` does,
    so the LoRA layer asks either base's weight the same questions.

    What it stores (``storage()``) are frozen ``nn.Parameter``s, not buffers, because FSDP2
    shards a module's parameters and leaves its buffers whole on every process:

    - ``codes``: uint8, two 4-bit codes per byte;
    - ``absmax``: float32, one per block; or, under double quantization, ``absmax_codes``
      (uint8, see below), ``absmax_scales`` (float32, one per 256 constants) and
      ``absmax_mean``, which stays a buffer: a 0-d scalar cannot be sharded.

    ``absmax_codes`` holds the bytes of the float8 codes ``quantize_absmax`` returns
    (``.view(torch.uint8)``, the same bit patterns), and ``block_absmax`` views them back as
    float8 to decode: the gloo backend cannot send float8 tensors (DDP broadcasts the parameters
    when it wraps the model), and FSDP2's mixed-precision policy casts every floating-point
    parameter to its ``param_dtype`` but leaves integer ones alone. ``quantize_absmax`` and
    ``dequantize_absmax`` keep to float8: the bytes are this layer's way of storing them.

    Args:
        linear: the layer to quantize; it is not changed.
        block_size: weights per absmax constant (64, as QLoRA).
        double_quant: also quantize the absmax constants (8-bit floats, blocks of 256).
    """

    def __init__(self, linear: nn.Linear, block_size: int = 64, double_quant: bool = False):
        super().__init__()
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"NF4Linear quantizes an nn.Linear, got {type(linear).__name__}")
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.block_size, self.double_quant = block_size, double_quant
        self.dtype = linear.weight.dtype  # what dequantize returns by default: the weight's original dtype
        self.store(linear.weight)
        bias = linear.bias
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None

    @torch.no_grad()
    def store(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` (out_features, in_features) into this layer's codes and absmax constants."""
        if weight.shape != self.shape:
            raise ValueError(f"weight of shape {tuple(weight.shape)} for an NF4Linear of shape {tuple(self.shape)}")
        codes, absmax = quantize_nf4(weight, self.block_size)
        self.codes = frozen(codes)
        self.blocks = absmax.numel()
        if self.double_quant:
            absmax_codes, absmax_scales, absmax_mean = quantize_absmax(absmax)
            self.absmax_codes = frozen(absmax_codes.view(torch.uint8))  # the float8 bit patterns, as bytes
            self.absmax_scales = frozen(absmax_scales)
            self.register_buffer("absmax_mean", absmax_mean)
        else:
            self.absmax = frozen(absmax)

    @property
    def weight(self) -> "NF4Linear":
        """W as ``LoRALinear`` asks for it: this layer, which answers ``shape``, ``dtype``, ``device`` and
        ``add_`` for the weight its codes stand for (``dequantize()`` gives the tensor itself)."""
        return self

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.out_features, self.in_features))

    @property
    def device(self) -> torch.device:
        """Where the weight is held: its codes' device."""
        return self.codes.device

    @torch.no_grad()
    def add_(self, delta: torch.Tensor) -> "NF4Linear":
        """W <- NF4(dequantize(W) + delta), in place, as ``Tensor.add_`` adds; rounds, so it warns.

        ``delta``: ``(out_features, in_features)``. The sum is rounded back to 4 bits, to keep the
        layer 4-bit: it then differs from W + delta by up to half a code step per weight, and
        adding ``-delta`` afterwards rounds again instead of restoring the original codes.
        ``dequantize_model(model)`` first gives a full-size weight, to which adding is exact.
        """
        warnings.warn("merging LoRA into a 4-bit base rounds W + ΔW to NF4 again, so outputs change by the "
                      "rounding; for an exact merge call lora.dequantize_model(model) first", stacklevel=2)
        self.store(self.dequantize(torch.float32) + delta.float())
        return self

    def block_absmax(self) -> torch.Tensor:
        """The absmax of every block, float32 (decoded from 8 bits first under double quantization)."""
        if self.double_quant:
            return dequantize_absmax(self.absmax_codes.view(FLOAT8), self.absmax_scales, self.absmax_mean, self.blocks)
        return self.absmax

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight the codes stand for, ``(out_features, in_features)``, in ``dtype`` (default: the original's)."""
        return dequantize_nf4(self.codes, self.block_absmax(), self.shape, self.block_size, dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return DequantizedLinear.apply(x, self)

    def _apply(self, fn, recurse: bool = True) -> "NF4Linear":
        """``nn.Module._apply`` (what ``.to()``, ``.half()``, ``.cuda()`` call), but what ``storage()``
        holds keeps its dtype: a cast moves it to ``fn``'s device and leaves its values alone.

        ``model.to(torch.bfloat16)`` would otherwise round the float32 block constants (absmax, or
        double quantization's scales and mean) to bf16 and so silently change every dequantized
        weight; the codes are integers, which ``.to(dtype)`` skips but ``.type(dtype)`` would not.
        The bias is cast as asked, and the layer dequantizes to the new dtype from then on (its
        ``dtype``), as after ``cast_frozen``. ``fn`` is asked first on an empty tensor of each
        stored tensor's dtype: where it changes only the device (or nothing), the tensor gets
        ``fn`` itself, so ``.to(device)``, ``.share_memory()`` and the like work as for any module.
        """
        stored = {id(tensor) for tensor in self.storage()}

        def keep_stored_dtype(tensor: torch.Tensor) -> torch.Tensor:
            if id(tensor) not in stored:
                return fn(tensor)
            target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
            return fn(tensor) if target.dtype == tensor.dtype else tensor.to(target.device)

        weight = fn(torch.empty(0, dtype=self.dtype, device=self.device))  # what fn makes of a weight
        super()._apply(keep_stored_dtype, recurse)
        if weight.is_floating_point():
            self.dtype = weight.dtype
        return self

    def storage(self) -> list[torch.Tensor]:
        """The tensors that hold the weight: the codes and the absmax constants (not the bias)."""
        if self.double_quant:
            return [self.codes, self.absmax_codes, self.absmax_scales, self.absmax_mean]
        return [self.codes, self.absmax]

    def storage_bits(self) -> int:
        """Bits held for the weight: the codes and the absmax constants (the bias not counted)."""
        return sum(tensor.numel() * tensor.element_size() * 8 for tensor in self.storage())

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"block_size={self.block_size}, double_quant={self.double_quant}")


def quantize_model(model: nn.Module, skip: tuple[str, ...] = ("lm_head",), block_size: int = 64,
                   double_quant: bool = False) -> list[str]:
    """Replace every ``nn.Linear`` of ``model`` with an ``NF4Linear``, in place; return their names.

    Modules whose name is in ``skip`` or ends in ``"." + entry`` stay as they are: by default
    the vocabulary head, whose outputs are the logits (QLoRA and bitsandbytes leave it too).
    Quantize before adding LoRA: the adapters' own A and B must stay in full precision.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)
             and not any(name == entry or name.endswith("." + entry) for entry in skip)]
    for name in names:
        model.set_submodule(name, NF4Linear(model.get_submodule(name), block_size, double_quant), strict=True)
    return names


def dequantize_model(model: nn.Module) -> list[str]:
    """Replace every ``NF4Linear`` of ``model`` (LoRA's base layers included) with a frozen ``nn.Linear``
    holding its dequantized weight, in place; return their names.

    The model then computes exactly what it computed quantized (up to float rounding), in full
    size: merging LoRA into it afterwards adds ΔW without rounding it to 4 bits.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, NF4Linear)]
    for name in names:
        layer = model.get_submodule(name)
        linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                           device=layer.device, dtype=layer.dtype)
        with torch.no_grad():
            linear.weight.copy_(layer.dequantize())
            if layer.bias is not None:
                linear.bias.copy_(layer.bias)
        model.set_submodule(name, linear.requires_grad_(False), strict=True)
    return names
