"""LoRA on ``embed_tokens`` (``lora/embedding.py``) against Hugging Face peft, and what merging does to tied embeddings.

peft's ``lora.Embedding`` runs the same operations in the same order, so the comparisons with it
are exact (rtol=0, atol=0). Merging rounds differently from the unmerged lookup (E + ΔWᵀ is
rounded once, as a table), so merged-against-unmerged comparisons use float32's default tolerance.
"""

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_lora, token_batch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from torch import nn
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, LlamaConfig

from lora import inject_lora, load_adapter, save_adapter
from lora.embedding import LoRAEmbedding, modules_sharing_weight
from models.loader import TINY_SHAPE, tiny_model

EXACT = dict(rtol=0, atol=0)
KEY_PREFIX = "base_model.model."  # peft's, as in lora/adapter.py
LINEAR_TARGETS = ("q_proj", "v_proj")


def tied_llama(seed: int = 0):
    """The tiny Llama with SmolLM2's tying: ``lm_head.weight is model.embed_tokens.weight``."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY_SHAPE, tie_word_embeddings=True)).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    return model


BASES = {"untied": lambda: tiny_model("tiny-llama"), "tied": tied_llama}


@pytest.fixture(params=list(BASES))
def base(request):
    return BASES[request.param]()


def inject(model, r=4, alpha=8, linear_targets=LINEAR_TARGETS) -> LoRAEmbedding:
    """LoRA on ``model.embed_tokens`` and on ``linear_targets``, in place; returns the ``LoRAEmbedding``.

    inject_lora goes first: it freezes every parameter but LoRALinear's A and B, and the new
    embedding's A and B must stay trainable.
    """
    if linear_targets:
        inject_lora(model, linear_targets, r=r, alpha=alpha)
    layer = LoRAEmbedding(model.model.embed_tokens, r=r, alpha=alpha)
    model.set_submodule("model.embed_tokens", layer, strict=True)
    return layer


def randomize(layer: LoRAEmbedding, seed: int = 0) -> LoRAEmbedding:
    """Seeded non-zero A and B, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in (layer.lora_embedding_A, layer.lora_embedding_B):
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return layer


def peft_model(base, r=4, alpha=8, linear_targets=LINEAR_TARGETS, **options):
    """peft's LoRA on a copy of ``base``, on embed_tokens and ``linear_targets`` (its tied-weights warning silenced)."""
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=["embed_tokens", *linear_targets], **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return get_peft_model(copy.deepcopy(base), config)


def trainable_state_dict(model) -> dict[str, torch.Tensor]:
    """Every trainable parameter under peft's file key: the parameter names already are peft's."""
    return {KEY_PREFIX + name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def ours_and_peft(base, linear_targets=LINEAR_TARGETS):
    """``(ours, layer, theirs)``: LoRA on the same modules of two copies of ``base``, with identical non-zero A, B."""
    ours = copy.deepcopy(base)
    layer = randomize(inject(ours, linear_targets=linear_targets))
    theirs = peft_model(base, linear_targets=linear_targets)
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if parameter.requires_grad:
                theirs.base_model.model.get_parameter(peft_parameter_name(name)).copy_(parameter)
    return ours, layer, theirs


def peft_parameter_name(name: str) -> str:
    """Our parameter's name in a peft model, which keys each A and B by adapter name: ``lora_A.default.weight``."""
    return re.sub(r"(lora_(?:embedding_)?[AB])(?=\.|$)", r"\1.default", name)


def peft_embedding(theirs):
    return theirs.base_model.model.model.embed_tokens


# --- initialisation ---------------------------------------------------------------------------------------------


def test_output_at_init_equals_the_base_model(base):
    ours = copy.deepcopy(base)
    inject(ours)
    ids = token_batch(base)
    with torch.no_grad():
        assert_close(ours(ids).logits, base(ids).logits, **EXACT)


def test_init_is_a_zero_b_standard_normal_as_peft():
    base = tiny_model("tiny-llama")
    torch.manual_seed(0)
    ours = inject(copy.deepcopy(base), r=16, linear_targets=())
    theirs = peft_embedding(peft_model(base, r=16, linear_targets=()))
    pairs = [(ours.lora_embedding_A, ours.lora_embedding_B),
             (theirs.lora_embedding_A["default"], theirs.lora_embedding_B["default"])]
    for A, B in pairs:
        assert A.shape == (16, 128) and B.shape == (64, 16)
        assert torch.count_nonzero(A) == 0
        # 1024 draws of N(0, 1): the bounds are five standard errors of the mean (0.031) and of the std (0.022).
        assert abs(B.mean().item()) < 0.15 and abs(B.std().item() - 1) < 0.11


def test_at_init_b_gets_no_gradient_and_a_does():
    model = tiny_model("tiny-llama")
    layer = inject(model, linear_targets=())
    ids = token_batch(model)
    model(ids, labels=ids).loss.backward()
    assert torch.count_nonzero(layer.lora_embedding_B.grad) == 0  # ∝ A[:, t] = 0
    assert torch.count_nonzero(layer.lora_embedding_A.grad) > 0  # ∝ Bᵀ g, B random


def test_tokens_never_seen_keep_their_embedding_after_adamw_steps():
    model = tiny_model("tiny-llama")
    layer = inject(model)
    pad = layer.base_layer.padding_idx
    assert pad == 0
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.01)
    seen = set()
    for step in range(3):
        ids = torch.randint(1, 20, (2, 12), generator=torch.Generator().manual_seed(step))
        ids[:, -2:] = pad  # seen too, but its column of A gets no gradient
        seen.update(ids.flatten().tolist())
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    delta = layer.delta_weight()
    unseen = sorted(set(range(model.config.vocab_size)) - seen)
    assert torch.count_nonzero(delta[unseen]) == 0
    assert torch.count_nonzero(delta[pad]) == 0
    assert all(torch.count_nonzero(delta[token]) == delta.shape[1] for token in seen - {pad})


# --- equal to peft ------------------------------------------------------------------------------------------------


def test_logits_and_gradients_equal_peft(base):
    ours, layer, theirs = ours_and_peft(base)
    ids = token_batch(base)
    ids[:, -2:] = base.config.pad_token_id  # padding_idx: that column of A gets no gradient, on both sides
    ours_out, theirs_out = ours(ids, labels=ids), theirs(ids, labels=ids)
    ours_out.loss.backward()
    theirs_out.loss.backward()
    assert_close(ours_out.logits, theirs_out.logits, **EXACT)
    assert layer.lora_embedding_A.grad is not None and layer.lora_embedding_B.grad is not None
    assert torch.count_nonzero(layer.lora_embedding_A.grad[:, base.config.pad_token_id]) == 0
    peft_layer = peft_embedding(theirs)
    assert_close(layer.lora_embedding_A.grad, peft_layer.lora_embedding_A["default"].grad, **EXACT)
    assert_close(layer.lora_embedding_B.grad, peft_layer.lora_embedding_B["default"].grad, **EXACT)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        mine, peft_linear = ours.get_submodule(name), theirs.base_model.model.get_submodule(name)
        assert mine.lora_A.weight.grad is not None
        assert_close(mine.lora_A.weight.grad, peft_linear.lora_A["default"].weight.grad, **EXACT)


def test_float32_adapter_on_a_bf16_base_equals_peft():
    # peft keeps A and B in float32 on a bf16 base (autocast_adapter_dtype) and casts the sum back to bf16.
    base = tiny_model("tiny-llama", dtype=torch.bfloat16)
    ours = copy.deepcopy(base)
    layer = randomize(LoRAEmbedding(ours.model.embed_tokens, r=4, alpha=8, dtype=torch.float32))
    ours.set_submodule("model.embed_tokens", layer, strict=True)
    theirs = peft_model(base, linear_targets=())
    peft_layer = peft_embedding(theirs)
    assert peft_layer.lora_embedding_A["default"].dtype == torch.float32
    with torch.no_grad():
        peft_layer.lora_embedding_A["default"].copy_(layer.lora_embedding_A)
        peft_layer.lora_embedding_B["default"].copy_(layer.lora_embedding_B)
        ids = token_batch(base)
        assert layer(ids).dtype == torch.bfloat16
        assert_close(ours(ids).logits, theirs(ids).logits, **EXACT)


def test_delta_weight_equals_peft(base):
    _, layer, theirs = ours_and_peft(base)
    assert_close(layer.delta_weight(), peft_embedding(theirs).get_delta_weight("default"), **EXACT)


def test_merged_model_equals_peft_merged(base):
    # For the tied model both merges change lm_head too: the same tensor, the same sum.
    ours, layer, theirs = ours_and_peft(base)
    layer.merge()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.merge_adapter()
    ids = token_batch(base)
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits, **EXACT)


# --- merge and unmerge ----------------------------------------------------------------------------------------------


def test_merge_adds_the_transposed_update_and_merging_twice_is_a_no_op():
    layer = randomize(LoRAEmbedding(nn.Embedding(50, 16), r=4, alpha=8))
    before = layer.base_layer.weight.detach().clone()
    A, B = layer.lora_embedding_A.detach(), layer.lora_embedding_B.detach()
    layer.merge()
    expected = before + (B @ A * (8 / 4)).T
    assert_close(layer.base_layer.weight, expected, **EXACT)
    layer.merge()
    assert_close(layer.base_layer.weight, expected, **EXACT)


def test_unmerge_restores_the_weight_to_rounding(base):
    model = copy.deepcopy(base)
    layer = randomize(inject(model, linear_targets=()))
    weight = layer.base_layer.weight
    before = weight.detach().clone()
    merged_abs = (before + layer.delta_weight()).abs()
    layer.merge()
    layer.unmerge()
    layer.unmerge()  # a no-op
    assert not layer.merged
    # (E + ΔWᵀ) - ΔWᵀ rounds twice: each element within float32's eps times the larger of |E|, |E + ΔWᵀ|.
    bound = torch.finfo(torch.float32).eps * torch.maximum(before.abs(), merged_abs)
    assert torch.all((weight - before).abs() <= bound)
    if modules_sharing_weight(model, layer):
        assert model.lm_head.weight is weight  # the head is restored with it: one tensor


def test_untied_merged_output_equals_unmerged():
    model = tiny_model("tiny-llama")
    layer = randomize(inject(model))
    assert modules_sharing_weight(model, layer) == []
    ids = token_batch(model)
    with torch.no_grad():
        unmerged = model(ids).logits
        layer.merge()
        # float32's default tolerance: the merged row E[t] + ΔWᵀ[t] is rounded as a table, not per lookup.
        assert_close(model(ids).logits, unmerged)


def test_tied_merge_changes_the_head_by_exactly_the_update():
    model = tied_llama()
    layer = randomize(inject(model, linear_targets=()))
    assert modules_sharing_weight(model, layer) == ["lm_head"]
    ids = token_batch(model)
    E, delta = layer.base_layer.weight.detach().clone(), layer.delta_weight()
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        unmerged = model(ids).logits
        assert_close(unmerged, F.linear(hidden, E), **EXACT)  # unmerged, the head multiplies by E alone
        layer.merge()
        merged = model(ids).logits
    assert model.lm_head.weight is layer.base_layer.weight
    assert_close(model.lm_head.weight, E + delta, **EXACT)
    # Merged, the head multiplies by E + ΔWᵀ: the default float32 tolerance for the rounding of the merged table.
    expected = F.linear(hidden, E + delta)
    assert_close(merged, expected)
    assert (merged - unmerged).abs().max() > 1000 * (merged - expected).abs().max()


# --- state dicts under peft's keys --------------------------------------------------------------------------------


def test_state_dict_keys_are_peft_keys(base):
    ours, _, theirs = ours_and_peft(base)
    keys = set(trainable_state_dict(ours))
    assert KEY_PREFIX + "model.embed_tokens.lora_embedding_A" in keys
    assert keys == set(get_peft_model_state_dict(theirs, save_embedding_layers=False))


def test_state_dict_saved_here_loads_into_peft(base):
    ours, _, _ = ours_and_peft(base)
    theirs = peft_model(base)  # fresh: A zero, B random
    result = set_peft_model_state_dict(theirs, trainable_state_dict(ours))
    assert result.unexpected_keys == []
    ids = token_batch(base)
    with torch.no_grad():
        assert_close(theirs(ids).logits, ours(ids).logits, **EXACT)


def test_peft_state_dict_loads_here(base):
    torch.manual_seed(1)
    theirs = peft_model(base, init_lora_weights=False)  # random A and B everywhere
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting save_embedding_layers to True": it adds the base table too
        tensors = get_peft_model_state_dict(theirs)
    ours = copy.deepcopy(base)
    inject(ours)
    base_key = KEY_PREFIX + "model.embed_tokens.base_layer.weight"
    assert set(tensors) == set(trainable_state_dict(ours)) | {base_key}
    with torch.no_grad():
        for key, tensor in tensors.items():  # peft's names are ours, so the key finds the parameter
            ours.get_parameter(key.removeprefix(KEY_PREFIX)).copy_(tensor)
    ids = token_batch(base)
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits, **EXACT)


# --- switches and errors ------------------------------------------------------------------------------------------


def test_disabled_layer_computes_the_base_embedding():
    layer = randomize(LoRAEmbedding(nn.Embedding(50, 16), r=4, alpha=8))
    ids = torch.arange(50)
    layer.disabled = True
    assert_close(layer(ids), layer.base_layer(ids), **EXACT)


@pytest.mark.parametrize(("base", "error", "message"), [
    (nn.Linear(4, 4), TypeError, "wraps an nn.Embedding"),
    (nn.Embedding(10, 4, max_norm=1.0), ValueError, "max_norm"),
    (nn.Embedding(10, 4, sparse=True), ValueError, "sparse"),
])
def test_unsupported_bases_are_refused_by_name(base, error, message):
    with pytest.raises(error, match=message):
        LoRAEmbedding(base, r=2, alpha=4)


def test_bad_rank_is_refused():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoRAEmbedding(nn.Embedding(10, 4), r=0, alpha=4)


# --- Through inject_lora, save_adapter, load_adapter and the loop ----------------------------------------------


def test_inject_lora_wraps_a_targeted_embedding_and_equals_peft(base):
    ours = copy.deepcopy(base)
    inject_lora(ours, ["embed_tokens", *LINEAR_TARGETS], r=4, alpha=8)
    assert isinstance(ours.model.embed_tokens, LoRAEmbedding)
    randomize(ours.model.embed_tokens)
    randomize_lora(ours)
    theirs = peft_model(base)
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if parameter.requires_grad:
                theirs.base_model.model.get_parameter(peft_parameter_name(name)).copy_(parameter)
    ids = token_batch(base)
    with torch.no_grad():
        assert_close(ours(ids).logits, theirs(ids).logits, **EXACT)


def test_embedding_adapter_saved_here_loads_in_peft_and_peft_s_loads_here(base, tmp_path):
    ours, _, theirs = ours_and_peft(base)
    save_adapter(ours, tmp_path / "ours")
    ids = token_batch(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's tied-weights and embedding-saving notices
        loaded_in_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
        theirs.save_pretrained(tmp_path / "theirs")  # with a copy of the whole table, as peft saves embeddings
    with torch.no_grad():
        assert_close(loaded_in_peft(ids).logits, ours(ids).logits, **EXACT)
    loaded_here = copy.deepcopy(base)
    load_adapter(loaded_here, tmp_path / "theirs")
    with torch.no_grad():
        assert_close(loaded_here(ids).logits, ours(ids).logits, **EXACT)


def test_peft_s_copy_of_another_embedding_table_is_refused_by_name(tmp_path):
    base = tiny_model("tiny-llama")
    _, _, theirs = ours_and_peft(base)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path)
    other = tiny_model("tiny-llama", seed=1)
    with pytest.raises(ValueError, match=r"base_model\.model\.model\.embed_tokens\.base_layer\.weight is a copy of "
                                         r"the embedding table that differs from this model's"):
        load_adapter(other, tmp_path)


@pytest.mark.parametrize("options", [dict(use_dora=True), dict(use_rslora=True), dict(init="pissa")])
def test_embedding_targets_with_dora_rslora_or_pissa_are_refused_by_name(options):
    with pytest.raises(ValueError, match="model.embed_tokens is an embedding, which this library adapts with plain"):
        inject_lora(tiny_model("tiny-llama"), ["embed_tokens", "q_proj"], r=4, alpha=8, **options)
