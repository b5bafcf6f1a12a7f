"""Named adapters on one base: add, switch, delete, save and load by name, each equal to peft's."""

import copy
import warnings

import pytest
import torch
from conftest import peft_with_named_adapters, token_batch, with_named_adapters
from torch.testing import assert_close

from lora import (
    active_adapter,
    add_adapter,
    adapter_names,
    delete_adapter,
    disable_lora,
    inject_lora,
    load_adapter,
    load_adapters,
    merge_and_unload,
    merge_lora,
    save_adapter,
    save_adapters,
    set_adapter,
)
from lora.adapter import adapter_state_dict
from lora.named import adapter_layers

# Three adapters of different r, alpha, targets and kinds on one base: peft's name for the first is "default".
ADAPTERS = {
    "default": dict(target_modules=["q_proj", "v_proj"], r=4, alpha=8),
    "french": dict(target_modules=["q_proj", "k_proj", "down_proj"], r=8, alpha=4),
    "stable": dict(target_modules=["v_proj", "o_proj"], r=2, alpha=4, use_rslora=True),
}


def randomize(layers, seed):
    """Seeded non-zero A and B for every layer of one adapter."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers.values():
            for weight in (layer.lora_A.weight, layer.lora_B.weight):
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.1)


def with_adapters(base, names=None):
    return with_named_adapters(base, ADAPTERS, names)


def peft_twin(base, model):
    return peft_with_named_adapters(base, model, ADAPTERS)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_added_adapter_waits_and_the_first_stays_active(tiny):
    model = with_adapters(tiny)
    assert adapter_names(model) == ["default", "french", "stable"]
    assert active_adapter(model) == "default"
    in_tree = {name for name, module in model.named_modules() if name.endswith(("k_proj", "o_proj"))}
    assert all(type(model.get_submodule(name)).__name__ == "Linear" for name in in_tree)


def test_each_adapter_set_active_equals_peft(tiny):
    model = with_adapters(tiny)
    theirs = peft_twin(tiny, model)
    ids = token_batch(tiny, batch=3)
    for name in ("french", "stable", "default"):
        set_adapter(model, name)
        theirs.set_adapter(name)
        assert_close(logits(model, ids), logits(theirs, ids), rtol=0, atol=0)


def test_adapters_of_different_ranks_change_the_output_differently(tiny):
    model = with_adapters(tiny)
    ids = token_batch(tiny)
    outputs = []
    for name in adapter_names(model):
        set_adapter(model, name)
        outputs.append(logits(model, ids))
    assert not torch.allclose(outputs[0], outputs[1]) and not torch.allclose(outputs[1], outputs[2])


def test_disable_lora_gives_the_base_whichever_adapter_is_active(tiny):
    model = with_adapters(tiny)
    ids = token_batch(tiny)
    set_adapter(model, "french")
    with disable_lora(model):
        assert_close(logits(model, ids), logits(tiny.eval(), ids), rtol=0, atol=0)


@pytest.mark.filterwarnings("ignore:Adapter default was active")
def test_deleting_the_active_adapter_activates_the_first_remaining_as_peft_does(tiny):
    model = with_adapters(tiny)
    theirs = peft_twin(tiny, model)
    ids = token_batch(tiny)
    delete_adapter(model, "default")
    theirs.delete_adapter("default")
    assert adapter_names(model) == ["french", "stable"]
    assert active_adapter(model) == "french" == theirs.active_adapter
    # peft's layers that lack "french" each activate their own first remaining adapter ("stable" in v_proj and
    # o_proj), which its model-wide active adapter does not say; set_adapter makes peft's layers agree with it.
    theirs.set_adapter("french")
    assert_close(logits(model, ids), logits(theirs, ids), rtol=0, atol=0)


def test_deleting_every_adapter_leaves_the_base_model(tiny):
    model = with_adapters(tiny)
    for name in adapter_names(model):
        delete_adapter(model, name)
    assert adapter_names(model) == [] and active_adapter(model) is None
    assert_close(logits(model, token_batch(tiny)), logits(tiny.eval(), token_batch(tiny)), rtol=0, atol=0)
    assert [name for name, _ in model.named_modules()] == [name for name, _ in tiny.named_modules()]


def test_only_the_active_adapter_is_in_parameters_and_trains(tiny):
    model = with_adapters(tiny)
    set_adapter(model, "french")
    trainable = {name for name, parameter in model.named_parameters() if parameter.requires_grad}
    assert trainable == {f"{path}.lora_{m}.weight" for path in adapter_layers(model, "french") for m in "AB"}
    waiting = [parameter for layer in adapter_layers(model, "default").values()
               for parameter in (layer.lora_A.weight, layer.lora_B.weight)]
    assert not any(parameter.requires_grad for parameter in waiting)


def test_switching_away_from_a_merged_adapter_unmerges_it_with_a_warning(tiny):
    model = with_adapters(tiny, ("default", "french"))
    ids = token_batch(tiny)
    set_adapter(model, "french")
    expected = logits(model, ids)
    set_adapter(model, "default")
    merge_lora(model)
    with pytest.warns(UserWarning, match="unmerging the adapter merged into"):
        set_adapter(model, "french")
    assert_close(logits(model, ids), expected, rtol=1e-6, atol=1e-6)  # W - ΔW + ΔW: float rounding only


def test_adding_an_adapter_to_a_merged_model_keeps_it_merged_and_the_same(tiny):
    model = with_adapters(tiny, ("default",))
    merge_lora(model)
    ids = token_batch(tiny)
    before = logits(model, ids)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # merged again afterwards: nothing to warn about
        add_adapter(model, "french", **ADAPTERS["french"])
    assert all(layer.merged for layer in adapter_layers(model, "default").values())
    assert_close(logits(model, ids), before, rtol=1e-6, atol=1e-6)


def test_merge_and_unload_keeps_the_active_adapter_and_drops_the_others(tiny):
    model = with_adapters(tiny)
    set_adapter(model, "stable")
    ids = token_batch(tiny)
    expected = logits(model, ids)
    merge_and_unload(model)
    assert adapter_names(model) == []
    assert_close(logits(model, ids), expected, rtol=1e-5, atol=1e-5)


def test_save_adapters_writes_peft_layout_that_peft_loads(tiny, tmp_path):
    from peft import PeftModel

    model = with_adapters(tiny)
    folder = save_adapters(model, tmp_path / "adapters")
    files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
    assert files == ["adapter_config.json", "adapter_model.safetensors", "french/adapter_config.json",
                     "french/adapter_model.safetensors", "stable/adapter_config.json",
                     "stable/adapter_model.safetensors"]
    theirs = PeftModel.from_pretrained(copy.deepcopy(tiny), folder)
    for name in ("french", "stable"):
        theirs.load_adapter(folder / name, adapter_name=name)
    theirs.eval()
    ids = token_batch(tiny)
    for name in adapter_names(model):
        set_adapter(model, name)
        theirs.set_adapter(name)
        assert_close(logits(theirs, ids), logits(model, ids), rtol=0, atol=0)


def test_load_adapters_reads_what_peft_save_pretrained_wrote(tiny, tmp_path):
    model = with_adapters(tiny)
    peft_twin(tiny, model).save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(tiny).eval()
    assert load_adapters(loaded, tmp_path / "peft") == ["default", "french", "stable"]
    ids = token_batch(tiny)
    for name in adapter_names(model):
        set_adapter(model, name)
        set_adapter(loaded, name)
        assert_close(logits(loaded, ids), logits(model, ids), rtol=0, atol=0)


def test_load_adapter_under_a_new_name_adds_it_without_switching(tiny, tmp_path):
    source = with_adapters(tiny, ("default", "french"))
    save_adapter(source, tmp_path / "french", adapter_name="french")  # a waiting adapter, saved by name
    model = with_adapters(tiny, ("default",))
    load_adapter(model, tmp_path / "french", adapter_name="french")
    assert adapter_names(model) == ["default", "french"] and active_adapter(model) == "default"
    for key, tensor in adapter_state_dict(source, "french").items():
        assert_close(adapter_state_dict(model, "french")[key], tensor, rtol=0, atol=0)


def test_load_adapter_by_the_name_of_a_waiting_adapter_loads_into_it(tiny, tmp_path):
    source = with_adapters(tiny, ("default", "french"))
    save_adapter(source, tmp_path / "french", adapter_name="french")
    model = with_adapters(tiny, ("default", "french"))
    randomize(adapter_layers(model, "french"), seed=7)
    load_adapter(model, tmp_path / "french", adapter_name="french")
    assert active_adapter(model) == "default"
    set_adapter(model, "french")
    set_adapter(source, "french")
    assert_close(logits(model, token_batch(tiny)), logits(source, token_batch(tiny)), rtol=0, atol=0)


def test_unknown_adapter_name_lists_the_names_there_are(tiny):
    model = with_adapters(tiny, ("default", "french"))
    with pytest.raises(KeyError, match=r"no adapter named 'frnech'; this model has \['default', 'french'\]"):
        set_adapter(model, "frnech")


@pytest.mark.parametrize("name, message", [("default", "already has an adapter named 'default'"),
                                           ("__base__", "'__base__' is the name of no adapter"),
                                           ("a/b", "without '/'"), ("", "non-empty")])
def test_a_taken_or_invalid_name_is_refused_and_nothing_changes(tiny, name, message):
    model = with_adapters(tiny, ("default",))
    ids = token_batch(tiny)
    before = logits(model, ids)
    with pytest.raises(ValueError, match=message):
        add_adapter(model, name, r=2)
    assert adapter_names(model) == ["default"]
    assert_close(logits(model, ids), before, rtol=0, atol=0)


def test_a_failed_add_leaves_the_model_as_it_was(tiny):
    model = with_adapters(tiny, ("default",))
    ids = token_batch(tiny)
    before = logits(model, ids)
    with pytest.raises(ValueError, match="no module matches"):
        add_adapter(model, "typo", target_modules=["q_projj"])
    assert adapter_names(model) == ["default"]
    assert_close(logits(model, ids), before, rtol=0, atol=0)


def test_pissa_is_refused_beside_other_adapters(tiny):
    model = with_adapters(tiny, ("default",))
    with pytest.raises(ValueError, match="PiSSA .* first adapter only"):
        add_adapter(model, "pissa", r=2, init="pissa")


def test_lora_changed_behind_the_registry_is_a_one_line_error(tiny):
    model = with_adapters(tiny, ("default", "french"))
    delete_adapter(model, "french")
    for path, layer in adapter_layers(model, "default").items():
        model.set_submodule(path, layer.base_layer)  # the adapter's layers taken out by hand
    inject_lora(model, ["k_proj"], r=2)
    with pytest.raises(ValueError, match="not those of its active adapter 'default'"):
        add_adapter(model, "french", r=2)


def test_a_model_with_lora_from_inject_lora_calls_it_default(tiny):
    inject_lora(tiny, r=4)
    assert adapter_names(tiny) == ["default"] and active_adapter(tiny) == "default"


def test_an_adapter_switched_in_follows_its_base_to_the_device_the_model_moved_to(tiny):
    model = with_adapters(tiny, ("default", "french"))
    model.to("meta")  # moves the tree: the base and the active adapter, not the waiting one
    assert adapter_layers(model, "french")["model.layers.0.self_attn.q_proj"].lora_A.weight.device.type == "cpu"
    set_adapter(model, "french")
    assert {parameter.device.type for parameter in model.parameters()} == {"meta"}
