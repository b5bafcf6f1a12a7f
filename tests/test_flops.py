"""FLOPs: the analytic count equals what torch's FlopCounterMode measures, and has the textbook shape."""

import copy

import pytest
import torch
from conftest import token_batch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoConfig, AutoModelForCausalLM, PretrainedConfig

from eval.flops import (
    PROJECTIONS,
    FlopCount,
    flops_of_model,
    format_flops,
    full_finetune_flops,
    lora_flops,
    main,
    transformer_flops,
)
from lora import inject_lora, lora_layers, merge_lora
from models.loader import EMBEDDED, EMBEDDED_SHAPE, embedded_model_file, load_config

BATCH, SEQ_LEN = 2, 32
TARGET_SETS = [
    ("q_proj", "v_proj"),  # the default: in layer 0 nothing before q and v needs a gradient, and K none at all
    ("k_proj", "o_proj"),  # layer 0: the scores need dK but no dQ
    ("gate_proj", "down_proj"),  # layer 0: no attention backward at all, the gradient starts in the MLP
    PROJECTIONS,
]


def measure(model: nn.Module, ids=None, embeds=None) -> tuple[int, int]:
    """``(forward, backward)`` matmul FLOPs that FlopCounterMode sees for the LM loss on ``ids``.

    Attention runs on SDPA's math backend: FlopCounterMode has no formula for the fused CPU kernel and
    would count attention as 0; the math backend computes the same full T x T square with plain matmuls.
    The cross-entropy, like every non-matmul, is counted by neither side.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        inputs = dict(input_ids=ids) if embeds is None else dict(inputs_embeds=embeds)
        loss = model(**inputs, labels=ids).loss
        forward = counter.get_total_flops()
        if loss.requires_grad:
            loss.backward()
    return forward, counter.get_total_flops() - forward


def inject_plain_lora(model, targets, r: int) -> None:
    """LoRA on the default, plain path, whose matmuls FlopCounterMode counts. The opt-in fused path
    (lora/fused.py) does the same matmuls in bf16, but adds two of them with in-place ``addmm_``,
    which FlopCounterMode does not count."""
    inject_lora(model, targets, r=r)


def smollm2() -> PretrainedConfig:
    return load_config(EMBEDDED)  # the shape alone: no file read


def test_inference_forward_equals_flop_counter(tiny):
    ids = token_batch(tiny, BATCH, SEQ_LEN)
    tiny.requires_grad_(False)
    expected = transformer_flops(tiny.config, SEQ_LEN, train=False).per_step(BATCH)
    assert measure(tiny, ids) == (expected.forward, 0)


@pytest.mark.parametrize("targets", TARGET_SETS, ids="+".join)
def test_lora_training_equals_flop_counter(tiny, targets):
    inject_plain_lora(tiny, targets, r=8)
    expected = transformer_flops(tiny.config, SEQ_LEN, targets, r=8).per_step(BATCH)
    # Exact, not merely within 5%: both sides count the same matmuls, with the same sizes.
    assert measure(tiny, token_batch(tiny, BATCH, SEQ_LEN)) == (expected.forward, expected.backward)


def test_full_finetuning_equals_flop_counter(tiny):
    tiny.requires_grad_(True)
    expected = full_finetune_flops(tiny.config, SEQ_LEN).per_step(BATCH)
    assert measure(tiny, token_batch(tiny, BATCH, SEQ_LEN)) == (expected.forward, expected.backward)


def test_full_finetuning_backward_is_twice_the_forward():
    config = smollm2()
    full, inference = full_finetune_flops(config, SEQ_LEN), transformer_flops(config, SEQ_LEN, train=False)
    attention = 4 * SEQ_LEN**2 * config.num_attention_heads * config.head_dim * config.num_hidden_layers
    assert full.forward == inference.forward
    assert full.backward == 2 * full.forward
    assert full.backward_weight == inference.forward - attention  # one gradient per weight: attention has none
    assert full.backward_input == inference.forward + attention  # dQ, dK, dP, dV: twice attention's forward


def test_frozen_weights_cost_no_weight_gradient_flops(tiny):
    """Unfreezing the base weights adds exactly their weight gradients, 2·tokens·numel(W) each, and nothing else.

    The input embeddings need a gradient in both runs, so that the input gradients are the same in both.
    """
    inject_plain_lora(tiny, ("q_proj", "v_proj"), r=8)
    ids = token_batch(tiny, BATCH, SEQ_LEN)
    embeds = tiny.get_input_embeddings()(ids).detach().requires_grad_(True)
    lora_forward, lora_backward = measure(tiny, ids, embeds)
    tiny.requires_grad_(True)
    full_forward, full_backward = measure(tiny, ids, embeds)
    adapters = {id(module) for _, layer in lora_layers(tiny) for module in (layer.lora_A, layer.lora_B)}
    base_weights = sum(m.weight.numel() for m in tiny.modules() if isinstance(m, nn.Linear) and id(m) not in adapters)
    assert full_forward == lora_forward
    assert full_backward - lora_backward == 2 * BATCH * SEQ_LEN * base_weights


def test_lora_flops_grow_linearly_in_r(tiny):
    """Measured and counted, each step in rank adds the same FLOPs: those of A and B for one rank, times the step."""
    targets, ids = ("q_proj", "v_proj"), token_batch(tiny, BATCH, SEQ_LEN)
    measured = {}
    for r in (4, 8, 12):
        model = copy.deepcopy(tiny)
        inject_plain_lora(model, targets, r=r)
        measured[r] = sum(measure(model, ids))
    one_rank = lora_flops(tiny.config, SEQ_LEN, targets, r=1)
    assert measured[8] - measured[4] == measured[12] - measured[8] == 4 * one_rank.per_step(BATCH).total
    for r in (4, 8, 12):
        assert lora_flops(tiny.config, SEQ_LEN, targets, r) == r * one_rank


def linear_weights(config) -> int:
    """Weights a token is multiplied by: every nn.Linear, the lm_head (the tied embedding) included.

    Counted on the meta device: the model has shapes but no memory, so this is instant.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))


def test_smollm2_forward_is_2N_per_token_plus_attention():
    """Kaplan et al.'s C_forward ≈ 2N per token, N the weights of the matmuls, plus attention's 4·L·T·H·d_h.

    N includes the lm_head: tied or not, it multiplies each token by a d x vocab matrix (28 M of SmolLM2's
    134 M), which "non-embedding parameters" would leave out.
    """
    config, short = smollm2(), 16
    n = linear_weights(config)
    forward = transformer_flops(config, short, train=False).per_token(short).forward
    attention = 4 * config.num_hidden_layers * short * config.num_attention_heads * config.head_dim
    assert forward == 2 * n + attention
    assert forward == pytest.approx(2 * n, rel=0.01)  # for short sequences attention is under 1%


def test_smollm2_training_is_6N_per_token_full_and_about_4N_with_lora():
    """Full fine-tuning costs 6N per token (Kaplan et al.); LoRA skips the weight gradients of W: about 4N."""
    config, short = smollm2(), 16
    n = linear_weights(config)
    full = full_finetune_flops(config, short).per_token(short)
    lora = transformer_flops(config, short, ("q_proj", "v_proj"), r=8).per_token(short)
    assert full.total == pytest.approx(6 * n, rel=0.01)
    assert lora.total == pytest.approx(4 * n, rel=0.01)
    assert lora.backward == pytest.approx(lora.forward, rel=0.01)  # backward ≈ one forward, not two


def test_flops_of_model_reads_targets_and_rank_from_the_model(tiny):
    assert flops_of_model(tiny, SEQ_LEN) == full_finetune_flops(tiny.config, SEQ_LEN)
    inject_lora(tiny, ("k_proj", "up_proj"), r=4)
    assert flops_of_model(tiny, SEQ_LEN) == transformer_flops(tiny.config, SEQ_LEN, ("k_proj", "up_proj"), r=4)
    merge_lora(tiny)
    assert flops_of_model(tiny, SEQ_LEN, train=False) == transformer_flops(tiny.config, SEQ_LEN, train=False)


def test_flops_of_model_rejects_adapters_not_in_every_layer(tiny):
    inject_lora(tiny, r"model\.layers\.0\.self_attn\.q_proj", r=4)
    with pytest.raises(ValueError, match="1 active LoRA layers, but \\['q_proj'\\] in each of 2 layers makes 2"):
        flops_of_model(tiny, SEQ_LEN)


@pytest.mark.parametrize("kwargs, message", [
    (dict(lora_targets=("q_projj",), r=8), "cannot count LoRA on \\['q_projj'\\]; FLOPs are counted for: q_proj"),
    (dict(lora_targets=("q_proj",), r=0), "r must be a positive integer"),
    (dict(), "nothing trains without LoRA targets"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as error:
        transformer_flops(smollm2(), SEQ_LEN, **kwargs)
    assert "\n" not in str(error.value)


def test_flop_count_per_token_step_and_run_rescale_one_sequence():
    count = FlopCount(forward=512, backward_input=256, backward_weight=128)
    assert count.backward == 384 and count.total == 896
    assert count.per_token(128) == FlopCount(4, 2, 1)
    assert count.per_run(steps=3, batch=2) == count.per_step(6) == FlopCount(3072, 1536, 768)


def test_command_prints_lora_and_full_finetuning_for_smollm2_without_weights(capsys):
    assert main(["--seq-len", "64", "--batch", "2", "--steps", "10"]) == 0
    out = capsys.readouterr().out
    config = smollm2()
    lora = transformer_flops(config, 64, ("q_proj", "v_proj"), r=8)
    full = full_finetune_flops(config, 64)
    forward_row = next(line for line in out.splitlines() if line.startswith("forward"))
    assert forward_row.split()[1:] == [
        word for count in (lora.per_token(64), full.per_token(64), lora.per_step(2), full.per_step(2))
        for word in (format_flops(count.forward) + "FLOP").split()
    ]
    assert f"LoRA costs {lora.total / full.total:.2f} x full fine-tuning" in out


def test_command_rejects_an_unknown_target_in_one_line(capsys):
    assert main(["--model", "tiny-llama", "--targets", "q_proj,qkv"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.slow
def test_the_loaders_smollm2_shape_matches_the_embedded_file():
    path = embedded_model_file()  # like every slow test, this needs the embedded model installed
    embedded = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert {key: getattr(embedded, key) for key in EMBEDDED_SHAPE} == EMBEDDED_SHAPE
