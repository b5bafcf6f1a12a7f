"""The next-token loss: -log p(token | the tokens before it), summed over the labelled tokens of a batch.

A causal LM's position t predicts token t + 1. Its loss there is the cross-entropy of its logits
``z = h W^T`` (``h`` the final hidden state, ``W`` the vocabulary head, ``(vocab, hidden)``)
against the next token y::

    loss = logsumexp(z) - z[y]                 d loss / d z = softmax(z) - onehot(y)

Only labelled tokens count: a label of ``IGNORE_INDEX`` (padding, or a prompt not trained on) is
not scored. The training loop, validation and perplexity (``eval/perplexity.py``) all take the
loss from ``summed_token_nll``, a sum whose mean is over ``label_tokens``.

The usual way computes ``z`` for every position at once: for SmolLM2, 49,152 logits a token,
in fp32 200 MB for a batch of 2 x 512 tokens, and as much again for its gradient, all to be
reduced to one number per token. Computed chunk by chunk, only one chunk's logits exist at a
time. The head is frozen (LoRA never trains it), so the backward needs only the gradient of
``h``, ``(softmax(z) - onehot(y)) W``, a (tokens, hidden) matrix: the forward computes it from
the chunk's logits while it holds them, and the backward scales it by the incoming gradient.
Keeping the logits for the backward instead, or recomputing them there, would cost memory or
a second pass over the head; this is how Liger-Kernel's fused linear cross-entropy does it on
GPUs, written here in plain PyTorch (``chunked_cross_entropy``), tested against ``F.cross_entropy``
on the full logits.
"""

import inspect

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.nn import functional as F

from lora.compute_dtype import compute_dtype
from models.precision import FP32, Precision

# The label of a token not scored: the ignore_index of F.cross_entropy and of transformers' own
# loss. data.sequences pads labels with its own copy (data and models do not import each other);
# tests/test_loss.py holds the two equal.
IGNORE_INDEX = -100
CHUNK_TOKENS = 256  # tokens whose logits exist at once: 256 x 49,152 fp32 logits are 50 MB
# Asking a transformers causal LM for the logits of no position (an empty index tensor) skips its head.
NO_POSITIONS = torch.empty(0, dtype=torch.long)


def summed_token_nll(model, batch: dict[str, torch.Tensor], precision: Precision = FP32,
                     chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """The sum of -log p(token | the tokens before it) over the labelled tokens of one padded batch.

    Position t predicts token t + 1, so the hidden states (or logits) drop their last position
    and the labels their first (the shift transformers applies inside ``model(..., labels=...)``).
    A sum, not a mean: divided by ``label_tokens`` of one batch it is the model's own loss, and
    divided by the label tokens of several batches it weighs every token the same (the training
    loop's gradient accumulation, ``training/loop.py``). Differentiable; ``.item()`` for a number.

    ``chunk_tokens``: the loss is taken ``chunk_tokens`` positions at a time from the final hidden
    states (``chunked_cross_entropy``), never forming the whole batch's logits; 0 forms them all
    and calls ``F.cross_entropy``, as does a model whose head is not a plain frozen ``Linear``.
    """
    labels = batch["labels"][:, 1:]
    with precision.autocast(batch["input_ids"].device):
        head = vocabulary_head(model) if chunk_tokens else None
        if head is not None:
            outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            output_hidden_states=True, logits_to_keep=NO_POSITIONS.to(batch["input_ids"].device))
            hidden = outputs.hidden_states[-1][:, :-1]  # after the final norm: what the head multiplies
            return chunked_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head, labels.reshape(-1), chunk_tokens)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    """How many tokens of ``batch`` are predicted and scored: labels other than -100, after the shift."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def vocabulary_head(model) -> torch.Tensor | None:
    """The head's weight ``(vocab, hidden)`` when the chunked loss can use it, else None.

    It can when the head is a plain ``nn.Linear`` without bias, frozen (not a LoRA target), and
    the model takes ``logits_to_keep`` (Llama, Qwen2 and most recent transformers models). Under
    DDP the model is ``.module``; under FSDP2 the head's weight is a shard, gathered whole here
    (FSDP2 gathers the head for its forward in any case).
    """
    inner = getattr(model, "module", model)  # DDP's wrapper holds the model as .module
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or head.bias is not None or head.weight.requires_grad:
        return None
    if "logits_to_keep" not in inspect.signature(inner.forward).parameters:
        return None
    weight = head.weight
    return weight.full_tensor() if isinstance(weight, DTensor) else weight


class ChunkedCrossEntropy(torch.autograd.Function):
    """The summed cross-entropy of ``hidden @ weight.T`` against ``labels``; see the module docstring.

    Shapes: ``hidden (tokens, d)``, ``weight (vocab, d)`` (frozen: it gets no gradient),
    ``labels (tokens,)`` with -100 for tokens not scored -> a 0-d float32 sum.
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk_tokens: int):
        if weight.requires_grad:
            raise ValueError("the chunked loss keeps the vocabulary head frozen; a trained head needs the full "
                             "logits: summed_token_nll(..., chunk_tokens=0)")
        dtype = compute_dtype(hidden)  # the dtype the head's matmul runs in: autocast's, else hidden's
        head = weight.to(dtype)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.zeros_like(hidden) if ctx.needs_input_grad[0] else None
        for start in range(0, hidden.shape[0], chunk_tokens):
            h, y = hidden[start : start + chunk_tokens].to(dtype), labels[start : start + chunk_tokens]
            scored = y != IGNORE_INDEX
            target = y.masked_fill(~scored, 0)[:, None]  # any valid index where unscored; masked out below
            logits = (h @ head.T).float()  # (chunk, vocab): the only logits that exist at once
            target_logits = logits.gather(1, target).squeeze(1)
            # logsumexp written out, in place over the logits (after this only exp(z - max) is needed):
            # each pass over a chunk's logits costs as much as the head's matmul does.
            row_max = logits.amax(dim=-1, keepdim=True)
            exp = logits.sub_(row_max).exp_()
            row_sum = exp.sum(dim=-1, keepdim=True)
            log_normalizer = (row_max + row_sum.log()).squeeze(1)
            total += ((log_normalizer - target_logits) * scored).sum()
            if grad_hidden is not None:
                grad_logits = exp.div_(row_sum)  # softmax(z), then minus onehot(y), then zero where unscored
                grad_logits.scatter_add_(1, target, -torch.ones_like(target, dtype=grad_logits.dtype))
                grad_logits[~scored] = 0
                grad_hidden[start : start + chunk_tokens] = grad_logits.to(dtype) @ head
        ctx.save_for_backward(grad_hidden)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad_hidden,) = ctx.saved_tensors
        return grad_hidden * grad_total.to(grad_hidden.dtype), None, None, None


def chunked_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                          chunk_tokens: int = CHUNK_TOKENS) -> torch.Tensor:
    """``F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")``, a chunk of tokens at a time.

    Shapes: ``hidden (tokens, d)``, ``weight (vocab, d)``, ``labels (tokens,)`` -> 0-d float32.
    Differentiable in ``hidden``; ``weight`` must be frozen.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    return ChunkedCrossEntropy.apply(hidden, weight, labels, chunk_tokens)
