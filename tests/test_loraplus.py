"""LoRA+ (Hayou et al., 2024): B trains at ``ratio`` times A's learning rate; the same steps as
peft's ``create_loraplus_optimizer``, bit for bit, and plain AdamW when ``ratio`` is 1.

Every optimizer here steps on gradients that are equal on both sides (test_peft_equivalence
shows the LoRA gradients equal peft's with rtol=0, atol=0) with the same learning rates, so
AdamW runs the same operations on the same values and the comparisons are exact.
"""

import copy

import pytest
import torch
from conftest import lora_and_peft, peft_lora, randomize_lora, token_batch
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_loraplus_optimizer
from torch.testing import assert_close

from lora import inject_lora, lora_layers
from lora.embedding import LoRAEmbedding
from lora.loraplus import PEFT_LR_EMBEDDING, loraplus_optimizer, loraplus_parameter_groups
from models.loader import tiny_model

EXACT = dict(rtol=0, atol=0)
LR, RATIO = 1e-3, 16.0  # 16: the paper's rule of thumb


@pytest.fixture(scope="module")
def llama():
    return tiny_model("tiny-llama")


def with_embedding_lora(base, seed=0):
    """``(ours, theirs)``: LoRA on embed_tokens, q_proj, v_proj of two copies of ``base``, identical non-zero A, B."""
    ours = copy.deepcopy(base)
    inject_lora(ours, ("q_proj", "v_proj"), r=4, alpha=8)
    embedding = LoRAEmbedding(ours.model.embed_tokens, r=4, alpha=8)
    ours.set_submodule("model.embed_tokens", embedding, strict=True)
    randomize_lora(ours, seed)
    generator = torch.Generator().manual_seed(seed)
    theirs = get_peft_model(copy.deepcopy(base),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj", "v_proj"]))
    peft_embedding = theirs.base_model.model.model.embed_tokens
    with torch.no_grad():
        for name in ("lora_embedding_A", "lora_embedding_B"):
            getattr(embedding, name).copy_(torch.randn(getattr(embedding, name).shape, generator=generator) * 0.1)
            getattr(peft_embedding, name)["default"].copy_(getattr(embedding, name))
        for mine, peft_layer in peft_lora(ours, theirs):
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B.weight)
    return ours, theirs


def adamw_steps(model, optimizer, steps=3):
    """``steps`` optimizer steps, each on the loss of its own seeded batch."""
    for step in range(steps):
        ids = token_batch(model, seed=step)
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()


def test_groups_hold_exactly_the_as_at_lr_and_the_bs_at_lr_times_ratio(llama):
    model = copy.deepcopy(llama)
    inject_lora(model, ("q_proj", "k_proj", "v_proj", "o_proj"), r=4, alpha=8)
    groups = loraplus_parameter_groups(model, lr=LR, ratio=RATIO, weight_decay=0.1)
    layers = [layer for _, layer in lora_layers(model)]
    assert [group["name"] for group in groups] == ["lora_A", "lora_B"]
    a, b = groups
    assert [id(p) for p in a["params"]] == [id(layer.lora_A.weight) for layer in layers]
    assert [id(p) for p in b["params"]] == [id(layer.lora_B.weight) for layer in layers]
    assert (a["lr"], a["lr_scale"], b["lr"], b["lr_scale"]) == (LR, 1.0, LR * RATIO, RATIO)
    assert a["weight_decay"] == b["weight_decay"] == 0.1


def test_embedding_lora_gets_a_group_of_its_own_at_peft_s_default_rate(llama):
    ours, _ = with_embedding_lora(llama)
    embedding = ours.model.embed_tokens
    group = loraplus_parameter_groups(ours, lr=LR, ratio=RATIO)[2]
    assert group["name"] == "embedding" and group["lr"] == PEFT_LR_EMBEDDING == 1e-6
    assert group["params"] == [embedding.lora_embedding_A, embedding.lora_embedding_B]
    assert loraplus_parameter_groups(ours, lr=LR, ratio=RATIO, lr_embedding=2e-3)[2]["lr"] == 2e-3


def test_another_trainable_parameter_gets_its_own_group_at_lr(llama):
    model = copy.deepcopy(llama)
    inject_lora(model, r=4, alpha=8)
    norm = model.model.norm.weight.requires_grad_(True)
    other = loraplus_parameter_groups(model, lr=LR, ratio=RATIO)[-1]
    assert (other["name"], other["params"], other["lr"], other["lr_scale"]) == ("other", [norm], LR, 1.0)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_parameters_equal_peft_loraplus_after_adamw_steps(llama, weight_decay):
    ours, theirs = lora_and_peft(llama)
    adamw_steps(ours, loraplus_optimizer(ours, lr=LR, ratio=RATIO, weight_decay=weight_decay))
    # peft reads the decay of its groups from loraplus_weight_decay; a weight_decay= there would be overridden.
    adamw_steps(theirs, create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                                  loraplus_weight_decay=weight_decay))
    for mine, peft_layer in peft_lora(ours, theirs):
        assert_close(mine.lora_A.weight, peft_layer.lora_A["default"].weight, **EXACT)
        assert_close(mine.lora_B.weight, peft_layer.lora_B["default"].weight, **EXACT)


def test_parameters_with_embedding_lora_equal_peft_loraplus_after_adamw_steps(llama):
    ours, theirs = with_embedding_lora(llama)
    options = dict(lr=LR, weight_decay=0.1, betas=(0.8, 0.99))
    adamw_steps(ours, loraplus_optimizer(ours, ratio=RATIO, lr_embedding=2e-3, **options))
    adamw_steps(theirs, create_loraplus_optimizer(theirs, torch.optim.AdamW, loraplus_lr_ratio=RATIO,
                                                  loraplus_lr_embedding=2e-3, loraplus_weight_decay=0.1, **options))
    trained = {name: p for name, p in ours.named_parameters() if p.requires_grad}
    theirs_trained = [p for p in theirs.parameters() if p.requires_grad]  # peft's order is the model's, as ours
    assert len(trained) == len(theirs_trained) == 2 * len(list(lora_layers(ours))) + 2  # every A and B, embedding's too
    for (name, mine), reference in zip(trained.items(), theirs_trained):
        assert_close(mine, reference, **EXACT, msg=name)


def test_ratio_one_equals_plain_adamw_on_every_lora_parameter(llama):
    ours, _ = lora_and_peft(llama)
    plain = copy.deepcopy(ours)
    adamw_steps(ours, loraplus_optimizer(ours, lr=LR, ratio=1.0, weight_decay=0.1))
    adamw_steps(plain, torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=LR, weight_decay=0.1))
    for (_, mine), (_, reference) in zip(lora_layers(ours), lora_layers(plain)):
        assert_close(mine.lora_A.weight, reference.lora_A.weight, **EXACT)
        assert_close(mine.lora_B.weight, reference.lora_B.weight, **EXACT)


def test_first_step_moves_b_ratio_times_as_far_as_plain_lora_and_a_as_far(llama):
    # Adam's first step is lr * g / (|g| + eps) per entry, proportional to lr: B's is ratio times plain LoRA's
    # (exactly so in float, ratio 16 being a power of 2).
    ours, _ = lora_and_peft(llama)
    plain = copy.deepcopy(ours)
    before = [(layer.lora_A.weight.clone(), layer.lora_B.weight.clone()) for _, layer in lora_layers(ours)]
    adamw_steps(ours, loraplus_optimizer(ours, lr=LR, ratio=RATIO), steps=1)
    adamw_steps(plain, loraplus_optimizer(plain, lr=LR, ratio=1.0), steps=1)
    for (a0, b0), (_, mine), (_, reference) in zip(before, lora_layers(ours), lora_layers(plain)):
        assert_close(mine.lora_A.weight, reference.lora_A.weight, **EXACT)
        # Not exact: adding a step to B rounds to B's float32 spacing, at most eps * max|B| (about 3e-8 here),
        # once on each side, and the plain side's rounding is multiplied by RATIO.
        spacing = torch.finfo(b0.dtype).eps * b0.abs().max().item()
        assert_close(mine.lora_B.weight - b0, RATIO * (reference.lora_B.weight - b0), rtol=0,
                     atol=(1 + RATIO) * spacing)


@pytest.mark.parametrize("ratio", [0, -16, float("nan"), float("inf"), True, "16"])
def test_ratio_that_is_not_a_positive_number_raises(llama, ratio):
    model = copy.deepcopy(llama)
    inject_lora(model, r=4, alpha=8)
    with pytest.raises(ValueError, match=r"^ratio must be a finite number > 0 .*1 is plain LoRA\), got"):
        loraplus_parameter_groups(model, lr=LR, ratio=ratio)
    with pytest.raises(ValueError, match=r"^lr must be a finite number > 0 \(A's learning rate\), got 0"):
        loraplus_parameter_groups(model, lr=0, ratio=RATIO)


def test_model_without_lora_raises_naming_inject_lora(llama):
    with pytest.raises(ValueError, match=r"^the model has no trainable LoRA A or B: add LoRA first with inject_lora"):
        loraplus_optimizer(copy.deepcopy(llama), lr=LR, ratio=RATIO)


def test_dora_magnitudes_train_with_b_as_in_peft_loraplus(llama):
    ours, theirs = lora_and_peft(llama, use_dora=True)
    groups = {group["name"]: group for group in loraplus_parameter_groups(ours, lr=LR, ratio=RATIO)}
    magnitudes = {id(layer.lora_magnitude_vector) for _, layer in lora_layers(ours)}
    assert magnitudes <= {id(p) for p in groups["lora_B"]["params"]}
    adamw_steps(ours, loraplus_optimizer(ours, lr=LR, ratio=RATIO))
    adamw_steps(theirs, create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO))
    for mine, peft_layer in peft_lora(ours, theirs):
        assert_close(mine.lora_magnitude_vector, peft_layer.lora_magnitude_vector["default"].weight, **EXACT)
        assert_close(mine.lora_B.weight, peft_layer.lora_B["default"].weight, **EXACT)
