"""Injection into whole models: name matching, freezing, counting, disabling, bad input."""

import copy

import pytest
import torch
from conftest import randomize_lora, token_batch
from torch.testing import assert_close
from transformers import GPT2Config, GPT2LMHeadModel

from lora import (
    LoRALinear,
    cast_frozen,
    count_parameters,
    disable_lora,
    find_linear_modules,
    inject_lora,
    lora_layers,
    merge_lora,
    parse_targets,
)
from models.loader import tiny_model

Q_AND_V = [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]


def test_list_targets_match_by_name_suffix(tiny):
    assert inject_lora(tiny, ["q_proj", "v_proj"]) == Q_AND_V
    assert all(isinstance(tiny.get_submodule(name), LoRALinear) for name in Q_AND_V)


def test_list_targets_match_full_names(tiny):
    assert inject_lora(tiny, ["model.layers.1.self_attn.q_proj"]) == ["model.layers.1.self_attn.q_proj"]


def test_list_suffix_matches_whole_name_components_only(tiny):
    with pytest.raises(ValueError, match="no module matches"):
        inject_lora(tiny, ["proj"])  # "q_proj" ends in "proj" but not in ".proj"


def test_string_target_is_a_regex_matching_the_whole_name(tiny):
    assert inject_lora(tiny, r".*\.1\.self_attn\.(q|v)_proj") == Q_AND_V[2:]


def test_string_target_must_match_the_whole_name_not_a_part(tiny):
    with pytest.raises(ValueError, match="no module matches"):
        inject_lora(tiny, "q_proj")  # re.fullmatch, not re.search


def test_only_lora_parameters_require_grad(tiny):
    inject_lora(tiny)
    trainable = {name for name, p in tiny.named_parameters() if p.requires_grad}
    expected = {f"{name}.lora_{m}.weight" for name in Q_AND_V for m in ("A", "B")}
    assert trainable == expected


def test_trainable_count_is_r_times_in_plus_out(tiny):
    _, total_before = count_parameters(tiny)
    r = 4
    names = inject_lora(tiny, ["q_proj", "k_proj", "v_proj", "o_proj"], r=r)
    expected = 0
    for name in names:
        base = tiny.get_submodule(name).base_layer
        expected += r * (base.in_features + base.out_features)
    trainable, total = count_parameters(tiny)
    assert trainable == expected
    assert total == total_before + expected


def test_only_lora_receives_gradients_and_base_is_bitwise_unchanged(tiny):
    inject_lora(tiny, r=4, alpha=8)
    randomize_lora(tiny)
    frozen = {name: p.detach().clone() for name, p in tiny.named_parameters() if not p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in tiny.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    ids = token_batch(tiny)
    tiny(ids, labels=ids).loss.backward()
    for name, p in tiny.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name
        else:
            assert p.grad is None, name
    optimizer.step()
    for name, p in tiny.named_parameters():
        if name in frozen:
            assert_close(p, frozen[name], rtol=0, atol=0)


def test_output_under_disable_lora_equals_base_model(tiny):
    base = copy.deepcopy(tiny)
    inject_lora(tiny)
    randomize_lora(tiny)
    ids = token_batch(tiny)
    with torch.no_grad():
        adapted = tiny(ids).logits
        with disable_lora(tiny):
            disabled = tiny(ids).logits
        after = tiny(ids).logits
        expected = base(ids).logits
    assert_close(disabled, expected)
    assert_close(after, adapted)
    assert not torch.allclose(adapted, expected)  # the adapter does change the output


def test_disable_lora_is_restored_after_an_exception(tiny):
    inject_lora(tiny)
    with pytest.raises(RuntimeError, match="boom"):
        with disable_lora(tiny):
            raise RuntimeError("boom")
    assert not any(layer.disabled for _, layer in lora_layers(tiny))


def test_disable_lora_on_merged_model_computes_base_and_merges_back(tiny):
    base = copy.deepcopy(tiny)
    inject_lora(tiny)
    randomize_lora(tiny)
    merge_lora(tiny)
    ids = token_batch(tiny)
    with torch.no_grad():
        merged = tiny(ids).logits
        with disable_lora(tiny):
            assert_close(tiny(ids).logits, base(ids).logits)
        assert_close(tiny(ids).logits, merged)
    assert all(layer.merged for _, layer in lora_layers(tiny))


def test_find_linear_modules_lists_every_linear(tiny):
    expected = []
    for i in range(2):
        expected += [f"model.layers.{i}.self_attn.{p}" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
        expected += [f"model.layers.{i}.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")]
    assert find_linear_modules(tiny) == expected + ["lm_head"]


def test_find_linear_modules_names_lora_layers_not_their_insides(tiny):
    before = find_linear_modules(tiny)
    inject_lora(tiny)
    assert find_linear_modules(tiny) == before


def test_no_match_error_lists_the_linear_modules(tiny):
    with pytest.raises(ValueError) as error:
        inject_lora(tiny, ["q_projj"])
    assert str(error.value) == (
        "no module matches ['q_projj']; Linear modules here end in: "
        "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, lm_head"
    )


def test_double_injection_is_an_error(tiny):
    inject_lora(tiny)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj already has LoRA"):
        inject_lora(tiny)


def test_injecting_other_modules_next_to_existing_lora_is_allowed(tiny):
    inject_lora(tiny, ["q_proj"])
    inject_lora(tiny, ["v_proj"])
    assert [name for name, _ in lora_layers(tiny)] == Q_AND_V


def test_regex_does_not_reach_inside_lora_layers(tiny):
    inject_lora(tiny, ["q_proj"])
    # ".*q_proj.*" would also match q_proj.base_layer and q_proj.lora_A: those are never targets.
    with pytest.raises(ValueError, match="already has LoRA"):
        inject_lora(tiny, ".*q_proj.*")


def test_non_linear_match_is_a_type_error_naming_it():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    with pytest.raises(TypeError, match=r"transformer\.h\.0\.attn\.c_attn .* is a Conv1D, not an nn\.Linear"):
        inject_lora(gpt2, ["c_attn"])


@pytest.mark.parametrize(
    "text, names",
    [("q_proj,v_proj", ["q_proj", "v_proj"]), (" q_proj, v_proj ", ["q_proj", "v_proj"]),
     ("q_proj,,v_proj,", ["q_proj", "v_proj"]), ("", []), (" , ", [])],
)
def test_parse_targets_splits_on_commas_and_drops_spaces_and_blanks(text, names):
    assert parse_targets(text) == names


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(r=0), "r must be"), (dict(alpha=-1.0), "alpha must be"), (dict(dropout=1.5), "dropout must be")],
)
def test_bad_hyperparameters_are_rejected_before_anything_changes(tiny, kwargs, message):
    with pytest.raises(ValueError, match=f"^{message}"):  # the name first, so a command line can prefix "--"
        inject_lora(tiny, **kwargs)
    assert not list(lora_layers(tiny))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_trains_and_merges_in_its_dtype(tiny, dtype):
    ids = token_batch(tiny)
    model = tiny.to(dtype)
    inject_lora(model, r=4, alpha=8)
    randomize_lora(model)
    assert {p.dtype for p in model.parameters()} == {dtype}
    model(ids, labels=ids).loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == dtype and torch.isfinite(g).all() for g in grads)
    with torch.no_grad():
        unmerged = model(ids).logits.float()
        merged = merge_lora(model)(ids).logits.float()
    assert_close(merged, unmerged, rtol=0.05, atol=0.05)


def test_adapter_dtype_gives_float32_a_and_b_on_a_bf16_base(tiny):
    model = tiny.to(torch.bfloat16)
    inject_lora(model, r=4, alpha=8, adapter_dtype=torch.float32)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}


def test_cast_frozen_casts_the_base_not_lora_nor_buffers_and_keeps_ties():
    model = tiny_model("tiny-qwen2")  # ties its embedding to the vocabulary head
    inject_lora(model, r=4, alpha=8)
    buffers = {name: buffer.clone() for name, buffer in model.named_buffers()}
    cast_frozen(model, torch.bfloat16)
    for name, parameter in model.named_parameters():
        assert parameter.dtype == (torch.float32 if parameter.requires_grad else torch.bfloat16), name
    for name, buffer in model.named_buffers():
        assert buffer.dtype == buffers[name].dtype and torch.equal(buffer, buffers[name]), name
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_cast_frozen_rounds_as_casting_the_model_does():
    model, reference = tiny_model("tiny-llama"), tiny_model("tiny-llama").to(torch.bfloat16)
    cast_frozen(model.requires_grad_(False), torch.bfloat16)
    for (name, parameter), expected in zip(model.named_parameters(), reference.parameters()):
        assert_close(parameter, expected, rtol=0, atol=0, msg=name)
