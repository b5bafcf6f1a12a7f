"""Shared fixtures: tiny seeded models built in code, the embedded model, and peft twins."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from lora import inject_lora, lora_layers, merge_and_unload
from models.loader import load_model, tiny_model

TINY_MODELS = ("tiny-qwen2", "tiny-llama")

# The core tier, ``python -m pytest -m core``: the LoRA layer, injection, merging, adapter files, the
# equivalence with peft, NF4 and the data, in about a minute; the tests to run while changing code. A test
# of these files that loads the embedded model (slow) or launches torchrun (distributed) stays out of it.
CORE = {"test_layer.py", "test_inject.py", "test_merge.py", "test_adapter.py", "test_peft_equivalence.py",
        "test_nf4.py", "test_lotka_volterra.py", "test_llmtime.py", "test_sequences.py", "test_collate.py",
        "test_tasks.py", "test_instructions.py"}


def pytest_collection_modifyitems(items):
    for item in items:
        if item.path.name in CORE and not {"slow", "distributed"} & {mark.name for mark in item.iter_markers()}:
            item.add_marker(pytest.mark.core)


@pytest.fixture(params=TINY_MODELS)
def tiny(request):
    """A fresh tiny random causal LM, once per architecture."""
    return tiny_model(request.param)


@pytest.fixture(scope="session")
def embedded_base():
    """The embedded SmolLM2-135M-Instruct, loaded once per session; tests deep-copy it before changing it."""
    model, _ = load_model()
    return model


@pytest.fixture
def embedded(embedded_base):
    return copy.deepcopy(embedded_base)


def token_batch(model, batch=2, length=12, seed=0):
    """Random token ids ``(batch, length)`` within the model's vocabulary."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.config.vocab_size, (batch, length), generator=generator)


def randomize_lora(model, seed=0):
    """Give every LoRA A and B seeded non-zero values, so the adapter changes the output."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_A.weight.copy_(torch.randn(layer.lora_A.weight.shape, generator=generator) * 0.1)
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.1)
    return model


def peft_lora(model, peft_model):
    """Pairs ``(ours, peft's)`` of LoRALinear and peft lora.Linear modules at the same module path."""
    inner = peft_model.base_model.model
    return [(layer, inner.get_submodule(name)) for name, layer in lora_layers(model)]


def lora_and_peft(base, target_modules=("q_proj", "v_proj"), r=4, alpha=8, dropout=0.0, seed=0, use_rslora=False,
                  use_dora=False):
    """``(ours, peft_model)``: two copies of ``base`` with LoRA on the same modules and identical non-zero A, B."""
    from peft import LoraConfig, get_peft_model

    ours = copy.deepcopy(base)
    # The plain path: peft's operations, in order.
    inject_lora(ours, target_modules, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora, use_dora=use_dora)
    randomize_lora(ours, seed)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        use_rslora=use_rslora, use_dora=use_dora)
    theirs = get_peft_model(copy.deepcopy(base), config)
    with torch.no_grad():
        for mine, peft_layer in peft_lora(ours, theirs):
            peft_layer.lora_A["default"].weight.copy_(mine.lora_A.weight)
            peft_layer.lora_B["default"].weight.copy_(mine.lora_B.weight)
            if use_dora:
                peft_layer.lora_magnitude_vector["default"].weight.copy_(mine.lora_magnitude_vector)
    return ours, theirs


@torch.no_grad()
def logits_before_and_after_unloading(model, ids, folder):
    """Logits on ``ids`` of ``model`` (with LoRA), then of the plain transformers model that
    ``merge_and_unload(model).save_pretrained(folder)`` wrote, loaded back from ``folder``."""
    before = model(ids).logits
    merge_and_unload(model).save_pretrained(folder)
    return before, AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits


def with_named_adapters(base, settings, names=None):
    """A copy of ``base`` in eval mode holding named adapters (``settings``: name -> ``add_adapter`` arguments;
    ``names``: which of them, default all), each with its own seeded non-zero A and B."""
    from lora import add_adapter
    from lora.named import adapter_layers, factors

    model = copy.deepcopy(base).eval()
    generator = torch.Generator().manual_seed(0)
    for name in names or settings:
        add_adapter(model, name, **settings[name])
        with torch.no_grad():
            for layer in adapter_layers(model, name).values():
                for factor in factors(layer):
                    factor.copy_(torch.randn(factor.shape, generator=generator) * 0.1)
    return model


def peft_factors(layer, name):
    """peft's ``(A, B)`` of adapter ``name`` in a peft LoRA layer, Linear or Embedding."""
    if name in layer.lora_embedding_A:
        return layer.lora_embedding_A[name], layer.lora_embedding_B[name]
    return layer.lora_A[name].weight, layer.lora_B[name].weight


def peft_with_named_adapters(base, model, settings):
    """peft's model (eval mode) with the same named adapters as ``model`` (``with_named_adapters``), A and B copied."""
    from peft import LoraConfig, get_peft_model

    from lora import adapter_names
    from lora.named import adapter_layers, factors

    peft_model = None
    for name in adapter_names(model):
        config = LoraConfig(r=settings[name]["r"], lora_alpha=settings[name]["alpha"],
                            target_modules=settings[name]["target_modules"],
                            use_rslora=settings[name].get("use_rslora", False))
        if peft_model is None:
            peft_model = get_peft_model(copy.deepcopy(base), config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        with torch.no_grad():
            for path, layer in adapter_layers(model, name).items():
                theirs = peft_model.base_model.model.get_submodule(path)
                for mine, their in zip(factors(layer), peft_factors(theirs, name)):
                    their.copy_(mine)
    return peft_model.eval()
