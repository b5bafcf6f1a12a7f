"""The next-token loss over a large vocabulary, a chunk of tokens at a time: never all the logits at once.

A causal LM's loss at one position is the cross-entropy of its logits ``z = h W^T`` (``h`` the
final hidden state, ``W`` the vocabulary head, ``(vocab, hidden)``) against the next token y::

    loss = logsumexp(z) - z[y]                 d loss / d z = softmax(z) - onehot(y)

The usual way computes ``z`` for every position at once: for SmolLM2, 49,152 logits a token,
in fp32 200 MB for a batch of 2 x 512 tokens, and as much again for its gradient, all to be
reduced to one number per token. Computed chunk by chunk, only one chunk's logits exist at a
time. The head is frozen (LoRA never trains it), so the backward needs only the gradient of
``h``, ``(softmax(z) - onehot(y)) W``, a (tokens, hidden) matrix: the forward computes it from
the chunk's logits while it holds them, and the backward scales it by the incoming gradient.
Keeping the logits for the backward instead, or recomputing them there, would cost memory or
a second pass over the head; this is how Liger-Kernel's fused linear cross-entropy does it on
GPUs, written here in plain PyTorch. It is what the training loop and validation compute
(``eval.perplexity.summed_token_nll``), tested against ``F.cross_entropy`` on the full logits.
"""

import torch

from lora.compute_dtype import compute_dtype

# The label of a token not scored: the ignore_index of F.cross_entropy and of transformers' own
# loss. data.sequences pads labels with its own copy (data and models do not import each other);
# tests/test_loss.py holds the two equal.
IGNORE_INDEX = -100
CHUNK_TOKENS = 256  # tokens whose logits exist at once: 256 x 49,152 fp32 logits are 50 MB


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
