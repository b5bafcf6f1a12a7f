"""The next-token loss: the chunked cross-entropy equals F.cross_entropy on the full logits, loss and gradient."""

import inspect

import pytest
import torch
from torch.nn import functional as F
from torch.testing import assert_close
from transformers.loss.loss_utils import ForCausalLMLoss

from data import sequences
from models import loss
from models.loss import chunked_cross_entropy


def test_the_loss_skips_the_label_the_data_pads_with_as_pytorch_and_transformers_do():
    pytorch = inspect.signature(F.cross_entropy).parameters["ignore_index"].default
    transformers = inspect.signature(ForCausalLMLoss).parameters["ignore_index"].default
    assert loss.IGNORE_INDEX == sequences.IGNORE_INDEX == pytorch == transformers == -100


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
