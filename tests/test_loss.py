"""The next-token loss: the model's own, a sum over label tokens, chunked or not; F.cross_entropy's, gradients too."""

import inspect

import pytest
import torch
from conftest import randomize_lora
from torch.nn import functional as F
from torch.testing import assert_close
from transformers.loss.loss_utils import ForCausalLMLoss

import data.sequences
import models.loss
from data.collate import PadCollator
from data.generated_tasks import generate_tasks
from data.tokenization import tokenize_example
from lora import inject_lora
from models.loader import char_tokenizer
from models.loss import chunked_cross_entropy, label_tokens, summed_token_nll

TOKENIZER = char_tokenizer()


def padded_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """``n`` instruction examples of different lengths, padded: prompts and padding labelled -100."""
    examples = [tokenize_example(task, TOKENIZER) for task in generate_tasks(n, seed=seed)]
    return PadCollator(TOKENIZER.pad_token_id)(examples)


def test_the_loss_skips_the_label_the_data_pads_with_as_pytorch_and_transformers_do():
    pytorch = inspect.signature(F.cross_entropy).parameters["ignore_index"].default
    transformers = inspect.signature(ForCausalLMLoss).parameters["ignore_index"].default
    assert models.loss.IGNORE_INDEX == data.sequences.IGNORE_INDEX == pytorch == transformers == -100


@pytest.mark.parametrize("chunk_tokens", [7, 0])
def test_summed_token_nll_over_label_tokens_is_the_models_own_loss(tiny, chunk_tokens):
    batch = padded_batch(4)
    with torch.no_grad():
        own = tiny(**batch).loss  # transformers shifts the labels and means over those not -100
        summed = summed_token_nll(tiny, batch, chunk_tokens=chunk_tokens)
    assert label_tokens(batch) == int((batch["labels"][:, 1:] != -100).sum()) < batch["labels"].numel()
    assert_close(summed / label_tokens(batch), own)


@pytest.mark.parametrize("chunk_tokens", [1, 37, 256, 5000])
def test_chunked_cross_entropy_and_its_gradient_equal_full_logits_cross_entropy(chunk_tokens):
    generator = torch.Generator().manual_seed(0)
    hidden = (torch.randn(1000, 64, generator=generator) * 0.2).requires_grad_()
    weight = torch.randn(300, 64, generator=generator)
    labels = torch.randint(0, 300, (1000,), generator=generator)
    labels[::7] = -100  # unscored tokens: padding or a masked prompt
    summed = chunked_cross_entropy(hidden, weight, labels, chunk_tokens)
    (grad,) = torch.autograd.grad(2 * summed, hidden)
    expected = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    (expected_grad,) = torch.autograd.grad(2 * expected, hidden)
    assert_close(summed, expected)
    assert_close(grad, expected_grad)


def test_chunked_loss_refuses_a_head_that_trains():
    weight = torch.randn(10, 4, requires_grad=True)
    with pytest.raises(ValueError, match="keeps the vocabulary head frozen"):
        chunked_cross_entropy(torch.randn(3, 4), weight, torch.tensor([1, 2, 3]))


def test_summed_token_nll_chunked_equals_full_logits_and_so_do_lora_gradients(tiny):
    inject_lora(tiny)
    randomize_lora(tiny)
    batch = padded_batch(4)
    results = []
    for chunk_tokens in (7, 0):  # 0: the whole batch's logits and F.cross_entropy
        loss = summed_token_nll(tiny, batch, chunk_tokens=chunk_tokens)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in tiny.parameters() if p.requires_grad]))
        tiny.zero_grad(set_to_none=True)
    (chunked, chunked_grads), (full, full_grads) = results
    assert_close(chunked, full)
    assert_close(chunked_grads, full_grads)
