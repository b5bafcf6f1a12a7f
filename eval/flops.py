"""What LoRA costs in compute: matmul FLOPs of training and inference, counted from the model config.

A matmul of an (m x k) matrix by a (k x n) one does m·n·k multiplies and as many adds: 2·m·n·k FLOPs.
A linear layer W (out x in) applied to T tokens is such a matmul, 2·T·in·out FLOPs: two FLOPs per weight
per token, so a forward pass costs about 2·N·T for N weights (Kaplan et al., 2020, "C_forward ≈ 2N").

The backward pass of ``y = x Wᵀ`` does two more matmuls of the same size::

    input gradient    dL/dx = dL/dy · W       2·T·in·out    needed when x depends on anything trainable
    weight gradient   dL/dW = dL/dyᵀ · x      2·T·in·out    needed only when W itself trains

Full fine-tuning does both for every weight: backward ≈ 2 x forward, training ≈ 6·N·T. LoRA freezes W,
and autograd skips the weight gradient of a frozen weight; but the input gradients must still be
computed, layer after layer, for the loss to reach the adapters of the early layers. So LoRA's backward
≈ 1 x forward, training ≈ 4·N·T plus the adapter's own small terms: about two thirds of full fine-tuning,
whatever r is (a little more for long sequences, where attention, which has no weights, weighs more).
LoRA's large saving is memory: no gradients and no optimizer state for W.

Where the gradient stops: autograd computes an input gradient only for an input that depends on
something trainable. Under LoRA the embedding is frozen, so the input of the first layer needs no
gradient: layer 0's q/k/v projections (and their LoRA A) skip it. This is counted exactly here.

An adapted layer (in -> out, rank r) adds, per token::

    forward            x·Aᵀ: 2·r·in              (x·Aᵀ)·Bᵀ: 2·r·out
    input gradients    through B: 2·r·out (always: A trains)    through A: 2·r·in (when x needs one)
    weight gradients   of A: 2·r·in                             of B: 2·r·out

Attention, per layer, for a sequence of T tokens and H query heads of size d_h: the scores Q·Kᵀ and
the mix scores·V cost 2·T²·H·d_h each. With grouped-query attention K and V have fewer heads (so
k_proj and v_proj are smaller), but every query head still attends, so these matmuls use H heads.
Causal masking: we count the full T x T square, because the math and eager kernels compute it and
``torch.utils.flop_counter.FlopCounterMode`` counts it (also for the fused flash kernels, which on a GPU
skip the masked blocks and do about half). Two caveats about that counter: it has no formula for the
fused CPU kernel, which it counts as 0 FLOPs (the tests run SDPA's math backend, made of plain
matmuls); and for fused kernels it adds one T² matmul to the backward, where they recompute Q·Kᵀ
rather than keep the scores. We count the math path, which keeps them.

Not counted, as the counter does not count them either: everything that is not a matmul. That is the
bias adds, RMSNorm, RoPE, SiLU and the gating product, softmax, residual adds, LoRA's scaling and add,
the cross-entropy, the embedding lookup (a gather) and its gradient (a scatter-add). Each costs O(T·d),
against O(T·d²) for the matmuls.

Counts are per sequence of ``seq_len`` tokens, since attention makes the cost of a token grow with T;
``FlopCount.per_token``, ``per_step`` and ``per_run`` rescale them.

    python -m eval.flops                        # SmolLM2-135M, seq_len 512, batch 2, 150 steps, r=8 on q, v
    python -m eval.flops --model tiny-llama --seq-len 64 --targets q_proj,k_proj,v_proj,o_proj
"""

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from lora.inject import lora_layers
from lora.targets import parse_targets, short_names
from models.loader import EMBEDDED, TINY_CONFIGS, load_config

# The projections in each Llama/Qwen2 decoder layer: the LoRA targets whose FLOPs are counted here.
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class FlopCount:
    """Matmul FLOPs of a forward pass and of its backward pass, the backward split in two.

    ``backward_input`` is the gradient with respect to activations, which carries the loss back
    through the network; ``backward_weight`` the gradient with respect to trainable weights. Counts
    from ``transformer_flops`` are for one sequence; ``*`` by a number and ``+`` work field by field.
    """

    forward: float
    backward_input: float = 0
    backward_weight: float = 0

    @property
    def backward(self) -> float:
        return self.backward_input + self.backward_weight

    @property
    def total(self) -> float:
        return self.forward + self.backward

    def __add__(self, other: "FlopCount") -> "FlopCount":
        return FlopCount(self.forward + other.forward, self.backward_input + other.backward_input,
                         self.backward_weight + other.backward_weight)

    def __mul__(self, factor: float) -> "FlopCount":
        return FlopCount(self.forward * factor, self.backward_input * factor, self.backward_weight * factor)

    __rmul__ = __mul__

    def __truediv__(self, divisor: float) -> "FlopCount":
        return FlopCount(self.forward / divisor, self.backward_input / divisor, self.backward_weight / divisor)

    def per_token(self, seq_len: int) -> "FlopCount":
        """This count of one sequence, divided among its ``seq_len`` tokens."""
        return self / seq_len

    def per_step(self, batch: int) -> "FlopCount":
        """This count of one sequence, for an optimizer step on ``batch`` sequences."""
        return self * batch

    def per_run(self, steps: int, batch: int) -> "FlopCount":
        """This count of one sequence, for a run of ``steps`` steps on ``batch`` sequences each."""
        return self * (steps * batch)


NOTHING = FlopCount(0)


@dataclass(frozen=True)
class Shape:
    """The sizes of a decoder-only transformer that its FLOPs depend on."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    def projection(self, name: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of the projection ``name`` (one of ``PROJECTIONS``)."""
        attention, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "q_proj": (self.hidden, attention),
            "k_proj": (self.hidden, kv),
            "v_proj": (self.hidden, kv),
            "o_proj": (attention, self.hidden),
            "gate_proj": (self.hidden, self.intermediate),
            "up_proj": (self.hidden, self.intermediate),
            "down_proj": (self.intermediate, self.hidden),
        }[name]


def shape_of(config: PretrainedConfig) -> Shape:
    """The ``Shape`` of a Llama- or Qwen2-style config (GQA attention, SwiGLU MLP).

    Raises:
        ValueError: the config lacks one of the sizes (it is not a decoder of that family).
    """
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    missing = [key for key in needed if getattr(config, key, None) is None]
    if missing:
        raise ValueError(f"{type(config).__name__} has no {', '.join(missing)}; FLOPs are counted for "
                         "Llama/Qwen2-style decoders (q/k/v/o projections, SwiGLU MLP)")
    heads = config.num_attention_heads
    # A config may leave these out: then K/V have as many heads as Q, and heads split the hidden size.
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return Shape(config.hidden_size, config.intermediate_size, config.num_hidden_layers, heads, kv_heads,
                 head_dim, config.vocab_size)


def linear_flops(tokens: int, n_in: int, n_out: int, grad_input: bool, grad_weight: bool) -> FlopCount:
    """FLOPs of ``y = x Wᵀ`` on ``tokens`` rows: 2·tokens·in·out forward, and as much per gradient computed.

    Args:
        grad_input: whether x needs a gradient (it depends on something trainable).
        grad_weight: whether W trains.
    """
    matmul = 2 * tokens * n_in * n_out
    return FlopCount(matmul, matmul if grad_input else 0, matmul if grad_weight else 0)


def lora_linear_flops(tokens: int, n_in: int, n_out: int, r: int, grad_input: bool) -> FlopCount:
    """FLOPs of LoRA's ``B(A(x))`` on ``tokens`` rows, A: (r, in), B: (out, r), both trained.

    Forward 2·r·(in + out) per token; backward the same again for the weight gradients of A and B,
    plus the input gradient through B (A trains, so it needs one) and, if x needs one, through A.
    """
    through_a = linear_flops(tokens, n_in, r, grad_input=grad_input, grad_weight=True)
    through_b = linear_flops(tokens, r, n_out, grad_input=True, grad_weight=True)
    return through_a + through_b


def attention_flops(seq_len: int, heads: int, head_dim: int, grad_q: bool, grad_k: bool, grad_v: bool) -> FlopCount:
    """FLOPs of ``softmax(Q Kᵀ / √d_h) V`` for one sequence, over the full T x T square (see the module notes).

    Each of the four backward matmuls is computed only if its result is needed: dQ = dS·K, dK = dSᵀ·Q,
    dP = dO·Vᵀ (when the scores depend on something trainable) and dV = Pᵀ·dO. None involves a weight.
    """
    one = 2 * seq_len * seq_len * heads * head_dim  # Q·Kᵀ, or scores·V, over all heads
    needed = (grad_q, grad_k, grad_q or grad_k, grad_v)
    return FlopCount(2 * one, one * sum(needed), 0)


def decoder_flops(
    config: PretrainedConfig, seq_len: int, lora_targets: Sequence[str], r: int, train: bool, train_base: bool
) -> tuple[FlopCount, FlopCount]:
    """``(model, adapters)``: FLOPs of one sequence through the frozen or trained model, and of LoRA's A and B.

    Follows ``requires_grad`` through every layer as autograd does: an activation needs a gradient when
    it depends on a trainable weight, and only then is an input gradient computed into it.

    Args:
        lora_targets: the projections adapted in every layer, with rank ``r``.
        train: count the backward pass too.
        train_base: every weight of the model trains (full fine-tuning), embedding included.
    """
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len <= 0:
        raise ValueError(f"seq_len must be a positive integer (tokens per sequence), got {seq_len!r}")
    shape, tokens = shape_of(config), seq_len
    model = adapters = NOTHING

    def project(name: str, grad_in: bool) -> bool:
        """Count the projection ``name`` on an input that needs a gradient or not; return whether its output does."""
        nonlocal model, adapters
        n_in, n_out = shape.projection(name)
        model += linear_flops(tokens, n_in, n_out, grad_in, grad_weight=train_base)
        if name in lora_targets:
            adapters += lora_linear_flops(tokens, n_in, n_out, r, grad_in)
        return grad_in or train_base or name in lora_targets

    grad = train_base  # the residual stream after the embedding: it needs a gradient only if the embedding trains
    for _ in range(shape.layers):
        grad_q, grad_k, grad_v = (project(name, grad) for name in ("q_proj", "k_proj", "v_proj"))
        model += attention_flops(seq_len, shape.heads, shape.head_dim, grad_q, grad_k, grad_v)
        grad = project("o_proj", grad_q or grad_k or grad_v) or grad  # the residual add joins the two paths
        grad_gate, grad_up = project("gate_proj", grad), project("up_proj", grad)
        grad = project("down_proj", grad_gate or grad_up) or grad
    model += linear_flops(tokens, shape.hidden, shape.vocab, grad, grad_weight=train_base)  # the lm_head
    if not train:
        return FlopCount(model.forward), FlopCount(adapters.forward)
    return model, adapters


def check_targets(lora_targets: Sequence[str], r: int) -> tuple[str, ...]:
    """``lora_targets`` as a tuple of projection names; raises ``ValueError`` for an unknown one or a bad r."""
    targets = (lora_targets,) if isinstance(lora_targets, str) else tuple(lora_targets)
    unknown = [name for name in targets if name not in PROJECTIONS]
    if unknown:
        raise ValueError(f"cannot count LoRA on {unknown}; FLOPs are counted for: {', '.join(PROJECTIONS)}")
    if targets and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
        raise ValueError(f"r must be a positive integer when LoRA targets are given, got {r!r}")
    return targets


def transformer_flops(
    config: PretrainedConfig, seq_len: int, lora_targets: Sequence[str] = (), r: int = 0, train: bool = True
) -> FlopCount:
    """Matmul FLOPs of one sequence of ``seq_len`` tokens, with LoRA of rank ``r`` on ``lora_targets``.

    With ``train`` the backward pass of LoRA training is counted too: only A and B get weight
    gradients. Without, this is inference with the adapters unmerged (merged, they cost nothing:
    pass no targets).

    Args:
        config: a Llama/Qwen2-style transformers config; only its sizes are read.
        seq_len: the tokens in the sequence, T. Attention costs grow as T², the rest as T.
        lora_targets: projection names adapted in every layer, e.g. ``("q_proj", "v_proj")``.
        r: the LoRA rank.
        train: count the backward pass.

    Raises:
        ValueError: an unknown target, a bad r, or ``train`` with no targets (nothing would train).
    """
    targets = check_targets(lora_targets, r)
    if train and not targets:
        raise ValueError("nothing trains without LoRA targets: pass lora_targets and r, "
                         "use full_finetune_flops(config, seq_len), or train=False for inference")
    model, adapters = decoder_flops(config, seq_len, targets, r, train, train_base=False)
    return model + adapters


def lora_flops(
    config: PretrainedConfig, seq_len: int, lora_targets: Sequence[str], r: int, train: bool = True
) -> FlopCount:
    """The part of ``transformer_flops(config, seq_len, lora_targets, r, train)`` spent in LoRA's A and B.

    Exactly proportional to r: every term has one factor r.
    """
    targets = check_targets(lora_targets, r)
    return decoder_flops(config, seq_len, targets, r, train, train_base=False)[1]


def full_finetune_flops(config: PretrainedConfig, seq_len: int) -> FlopCount:
    """Matmul FLOPs of one sequence of full fine-tuning: every weight, the embedding too, trains.

    Every input gradient is then needed, and every weight gets its gradient: backward = 2 x forward
    for the linear layers (attention, which has no weights, is 2 x forward in both cases).
    """
    model, _ = decoder_flops(config, seq_len, (), 0, train=True, train_base=True)
    return model


def flops_of_model(model: nn.Module, seq_len: int, train: bool = True) -> FlopCount:
    """FLOPs of one sequence through ``model``, reading the LoRA targets and rank from its ``LoRALinear`` layers.

    A model with no LoRA layer is counted as full fine-tuning (``train``) or plain inference. Merged
    or disabled LoRA layers run their base only, so they add nothing. For a training step on a batch,
    ``flops_of_model(model, seq_len).per_step(batch)``.

    Raises:
        ValueError: the adapters differ in rank, do not cover every layer alike, or (``train``) are all
            merged or disabled.
    """
    layers = dict(lora_layers(model))
    if not layers:
        if train:
            return full_finetune_flops(model.config, seq_len)
        return transformer_flops(model.config, seq_len, train=False)
    active = {name: layer for name, layer in layers.items() if not (layer.merged or layer.disabled)}
    if not active and train:
        raise ValueError("every LoRA layer is merged or disabled, so nothing trains; unmerge_lora(model) first")
    targets = short_names(list(active))
    ranks = sorted({layer.r for layer in active.values()})
    if len(ranks) > 1:
        raise ValueError(f"the LoRA layers have ranks {ranks}; FLOPs are counted for one rank in every layer")
    expected = len(targets) * model.config.num_hidden_layers
    if len(active) != expected:
        raise ValueError(f"{len(active)} active LoRA layers, but {targets} in each of "
                         f"{model.config.num_hidden_layers} layers makes {expected}; FLOPs are counted for "
                         "the same targets in every layer")
    return transformer_flops(model.config, seq_len, targets, ranks[0] if ranks else 0, train)


def format_flops(value: float) -> str:
    """``value`` with an SI prefix, e.g. ``2.7e8`` -> ``'270.0 M'``."""
    for prefix, scale in (("E", 1e18), ("P", 1e15), ("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f} {prefix}"
    return f"{value:.1f} "


def flops_table(config: PretrainedConfig, seq_len: int, batch: int, steps: int, targets: Sequence[str], r: int) -> str:
    """The report ``python -m eval.flops`` prints: LoRA against full fine-tuning, per token and per step."""
    lora, full = transformer_flops(config, seq_len, targets, r), full_finetune_flops(config, seq_len)
    adapters, merged = lora_flops(config, seq_len, targets, r), transformer_flops(config, seq_len, train=False)
    columns = (lora.per_token(seq_len), full.per_token(seq_len), lora.per_step(batch), full.per_step(batch))
    rows = [f"{'':24}{'per token':^26}{f'per step ({batch} x {seq_len} tokens)':^26}",
            f"{'':24}" + "".join(f"{heading:>13}" for heading in ("LoRA", "full FT") * 2)]
    for label, field in (("forward", "forward"), ("backward: input grads", "backward_input"),
                         ("backward: weight grads", "backward_weight"), ("total", "total")):
        rows.append(f"{label:24}" + "".join(f"{format_flops(getattr(count, field)) + 'FLOP':>13}" for count in columns))
    run_lora, run_full = lora.per_run(steps, batch).total, full.per_run(steps, batch).total
    rows += [
        "",
        f"per run ({steps} steps): LoRA {format_flops(run_lora)}FLOP, full fine-tuning {format_flops(run_full)}FLOP; "
        f"LoRA costs {run_lora / run_full:.2f} x full fine-tuning",
        f"LoRA's own A and B: {format_flops(adapters.per_token(seq_len).total)}FLOP per token, "
        f"{100 * adapters.total / lora.total:.2f}% of LoRA training",
        f"inference forward: {format_flops(lora.per_token(seq_len).forward)}FLOP per token with the adapters, "
        f"{format_flops(merged.per_token(seq_len).forward)}FLOP merged into W (as the base model)",
    ]
    return "\n".join(row.rstrip() for row in rows)


def positive_int(text: str) -> int:
    """argparse type: an integer > 0."""
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.flops", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default=EMBEDDED, help=f"{EMBEDDED}, {', '.join(TINY_CONFIGS)} or a model folder")
    parser.add_argument("--seq-len", type=positive_int, default=512, help="tokens per sequence")
    parser.add_argument("--batch", type=positive_int, default=2, help="sequences per optimizer step")
    parser.add_argument("--steps", type=positive_int, default=150, help="optimizer steps in the run")
    parser.add_argument("--r", type=positive_int, default=8, help="LoRA rank")
    parser.add_argument("--targets", default="q_proj,v_proj", help="comma-separated projections adapted")
    args = parser.parse_args(argv)
    targets = parse_targets(args.targets)
    try:
        config = load_config(args.model)
        shape = shape_of(config)
        table = flops_table(config, args.seq_len, args.batch, args.steps, targets, args.r)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"matmul FLOPs of {args.model} ({shape.layers} layers, hidden {shape.hidden}, vocab {shape.vocab}), "
          f"LoRA r={args.r} on {', '.join(targets)}; attention counted over the full T x T square")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
