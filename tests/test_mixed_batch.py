"""Mixed-adapter batches: each row through its own adapter, equal to that row alone with it, and to peft's."""

import pytest
import torch
from conftest import peft_with_named_adapters, token_batch, with_named_adapters
from torch.testing import assert_close

from eval.generate import generate
from lora import add_adapter, disable_lora, merge_lora, mixed_batch, set_adapter

# Different r, alpha, targets, an embedding adapter and rsLoRA: the stacks pad each to the largest r.
ADAPTERS = {
    "default": dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8),
    "french": dict(target_modules=["q_proj", "k_proj", "down_proj"], r=8, alpha=4),
    "words": dict(target_modules=["embed_tokens", "o_proj"], r=2, alpha=4),
    "stable": dict(target_modules=["v_proj", "up_proj"], r=6, alpha=3, use_rslora=True),
}
ROWS = ["french", "__base__", "default", "words", "french", "stable"]


def with_adapters(base, names=None):
    return with_named_adapters(base, ADAPTERS, names)


def alone(model, name, ids):
    """Logits of ``ids`` computed with the adapter ``name`` active ("__base__": none), one row at a time."""
    with torch.no_grad():
        if name == "__base__":
            with disable_lora(model):
                return model(ids).logits
        set_adapter(model, name)
        return model(ids).logits


def test_each_row_of_a_mixed_batch_equals_that_row_alone_with_its_adapter(tiny):
    model = with_adapters(tiny)
    ids = token_batch(tiny, batch=len(ROWS), length=10)
    with torch.no_grad(), mixed_batch(model, ROWS):
        mixed = model(ids).logits
    for row, name in enumerate(ROWS):
        assert_close(mixed[row], alone(model, name, ids[row:row + 1])[0], rtol=1e-5, atol=1e-6)


def test_mixed_batch_equals_peft_adapter_names(tiny):
    model = with_adapters(tiny)
    theirs = peft_with_named_adapters(tiny, model, ADAPTERS)
    ids = token_batch(tiny, batch=len(ROWS), length=10)
    with torch.no_grad(), mixed_batch(model, ROWS):
        mixed = model(ids).logits
    with torch.no_grad():
        assert_close(mixed, theirs(ids, adapter_names=ROWS).logits, rtol=1e-5, atol=1e-6)


def test_the_model_is_as_it_was_after_a_mixed_batch(tiny):
    model = with_adapters(tiny)
    set_adapter(model, "french")
    ids = token_batch(tiny, batch=len(ROWS))
    before = alone(model, "french", ids)
    modules = dict(model.named_modules())
    with torch.no_grad(), mixed_batch(model, ROWS):
        model(ids)
    assert dict(model.named_modules()).keys() == modules.keys()
    assert all(model.get_submodule(name) is module for name, module in modules.items())
    assert_close(alone(model, "french", ids), before, rtol=0, atol=0)


def test_greedy_generation_of_a_mixed_batch_equals_each_row_alone(tiny):
    model = with_adapters(tiny)
    ids = token_batch(tiny, batch=len(ROWS), length=6)
    # A row that finishes early leaves the batch, and its adapter must leave with it: the EOS id is a token
    # that row 0 writes by its third step, so at least row 0 finishes before the others.
    eos = int(generate(model, ids, max_new_tokens=3, adapter_names=ROWS)[0, 2])
    mixed = generate(model, ids, max_new_tokens=8, eos_token_id=eos, adapter_names=ROWS)
    assert mixed.shape[1] == 8 and (mixed[0, :3] == eos).any()
    for row, name in enumerate(ROWS):
        if name == "__base__":
            with disable_lora(model):
                expected = generate(model, ids[row:row + 1], max_new_tokens=8, eos_token_id=eos)
        else:
            set_adapter(model, name)
            expected = generate(model, ids[row:row + 1], max_new_tokens=8, eos_token_id=eos)
        assert torch.equal(mixed[row, : expected.shape[1]], expected[0])


def test_samples_of_one_prompt_each_keep_its_adapter(tiny):
    model = with_adapters(tiny)
    ids = token_batch(tiny, batch=2, length=6)
    mixed = generate(model, ids, max_new_tokens=5, samples_per_prompt=3, adapter_names=["french", "words"])
    for prompt, name in enumerate(["french", "words"]):
        set_adapter(model, name)
        expected = generate(model, ids[prompt:prompt + 1], max_new_tokens=5)
        for sample in range(3):  # greedy: every sample of a prompt is its greedy continuation
            assert torch.equal(mixed[3 * prompt + sample], expected[0])


def test_a_mixed_batch_is_refused_while_training(tiny):
    model = with_adapters(tiny)
    model.train()
    with pytest.raises(ValueError, match="for inference: call model.eval"):
        with mixed_batch(model, ROWS):
            pass
    model.eval()
    with pytest.raises(ValueError, match="for inference: call model.eval"), mixed_batch(model, ROWS):
        model.train()
        model(token_batch(tiny, batch=len(ROWS)))


@pytest.mark.parametrize("names, message", [
    (["default", "frnech"], r"no adapter named 'frnech'; this model has \['default', 'french', 'words', 'stable'\]"),
    ([], "one adapter name per row"),
])
def test_unknown_or_missing_names_are_one_line_errors(tiny, names, message):
    model = with_adapters(tiny)
    with pytest.raises(ValueError, match=message), mixed_batch(model, names):
        pass


def test_a_batch_of_the_wrong_size_is_a_one_line_error(tiny):
    model = with_adapters(tiny)
    with pytest.raises(ValueError, match="the batch has 2 rows but 6 adapter names"), mixed_batch(model, ROWS):
        model(token_batch(tiny, batch=2))


def test_a_merged_adapter_is_refused(tiny):
    model = with_adapters(tiny)
    merge_lora(model)
    with pytest.raises(ValueError, match="'default' is merged into W"), mixed_batch(model, ROWS):
        pass


def test_dora_adapters_are_refused_as_peft_refuses_them(tiny):
    model = with_adapters(tiny, ["default"])
    add_adapter(model, "dora", r=4, use_dora=True)
    with pytest.raises(ValueError, match="dora is a DoRA adapter"), mixed_batch(model, ["default", "dora"]):
        pass
