"""Adapter files: peft's key names and config, safetensors only, both files replaced at once, one-line errors."""

import json
import pickle
import re
from types import SimpleNamespace

import pytest
import torch
from conftest import randomize_lora, token_batch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from lora import adapter as adapter_module
from lora import adapter_config, adapter_state_dict, inject_lora, load_adapter, lora_layers, save_adapter
from models.loader import tiny_model


@pytest.fixture
def saved(tiny, tmp_path):
    """``(model, folder)``: a tiny model with a non-zero adapter, saved to ``folder``."""
    inject_lora(tiny, r=4, alpha=8)
    randomize_lora(tiny)
    return tiny, save_adapter(tiny, tmp_path / "adapter")


def fresh_like(model):
    return tiny_model("tiny-llama" if model.config.model_type == "llama" else "tiny-qwen2")


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_saved_keys_are_peft_keys(saved):
    model, folder = saved
    keys = set(load_file(folder / "adapter_model.safetensors"))
    expected = {f"base_model.model.model.layers.{i}.self_attn.{p}.lora_{m}.weight"
                for i in range(2) for p in ("q_proj", "v_proj") for m in ("A", "B")}
    assert keys == expected


def test_saved_config_has_peft_fields(saved):
    _, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"]) == (4, 8, 0.0)
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert config["bias"] == "none"
    assert "base_model_name_or_path" in config


def test_partial_injection_saves_full_module_names(tiny):
    inject_lora(tiny, ["model.layers.0.self_attn.q_proj"])
    # "q_proj" alone would also select layer 1's q_proj when the adapter is loaded.
    assert adapter_config(tiny)["target_modules"] == ["model.layers.0.self_attn.q_proj"]


def test_save_then_load_gives_the_same_logits(saved):
    model, folder = saved
    fresh = fresh_like(model)
    ids = token_batch(model)
    assert load_adapter(fresh, folder) == [name for name, _ in lora_layers(model)]
    assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)


def test_load_injects_with_the_config_r_alpha_and_targets(tiny, tmp_path):
    inject_lora(tiny, ["k_proj", "o_proj"], r=2, alpha=5, dropout=0.1)
    folder = save_adapter(tiny, tmp_path)
    fresh = fresh_like(tiny)
    load_adapter(fresh, folder)
    layers = dict(lora_layers(fresh))
    assert list(layers) == [name for name, _ in lora_layers(tiny)]
    assert {(layer.r, layer.alpha, layer.dropout) for layer in layers.values()} == {(2, 5, 0.1)}


def test_load_into_a_model_with_the_same_lora_replaces_a_and_b(saved):
    model, folder = saved
    fresh = fresh_like(model)
    inject_lora(fresh, r=4, alpha=8)
    load_adapter(fresh, folder)
    ids = token_batch(model)
    assert_close(logits(fresh, ids), logits(model, ids), rtol=0, atol=0)


def test_load_into_a_merged_model_replaces_the_merged_update(saved):
    model, folder = saved
    fresh = fresh_like(model)
    inject_lora(fresh, r=4, alpha=8)
    randomize_lora(fresh, seed=7)
    for _, layer in lora_layers(fresh):
        layer.merge()
    load_adapter(fresh, folder)
    assert all(layer.merged for _, layer in lora_layers(fresh))
    ids = token_batch(model)
    assert_close(logits(fresh, ids), logits(model, ids), rtol=1e-5, atol=1e-5)


def files(folder):
    return {path.name: path.read_bytes() for path in folder.iterdir()}


def test_save_keeps_the_old_files_when_writing_fails(saved, monkeypatch):
    model, folder = saved
    before = files(folder)
    randomize_lora(model, seed=3)

    def crash(tensors, path, metadata=None):
        path.write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_module, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, folder)
    assert files(folder) == before
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]  # no temporary folder left


def test_a_crash_between_the_two_files_leaves_the_old_adapter_whole(saved, monkeypatch):
    model, folder = saved
    before, old_weights = files(folder), {key: t.clone() for key, t in adapter_state_dict(model).items()}
    randomize_lora(model, seed=3)  # new weights, so a new file beside the old config would show
    weights_written = []

    def save_weights(tensors, path, metadata=None):
        save_file(tensors, path, metadata=metadata)
        weights_written.append(path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(adapter_module, "save_file", save_weights)
    monkeypatch.setattr(adapter_module, "json", SimpleNamespace(dumps=crash))  # the config, written second
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, folder)
    assert len(weights_written) == 1  # the new weights were on disk when the config failed
    assert files(folder) == before
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]
    monkeypatch.undo()
    fresh = fresh_like(model)
    load_adapter(fresh, folder)
    for key, tensor in adapter_state_dict(fresh).items():
        assert_close(tensor, old_weights[key], rtol=0, atol=0)


def test_saving_over_an_adapter_replaces_both_files_and_leaves_no_temporaries(saved):
    model, folder = saved
    randomize_lora(model, seed=3)
    save_adapter(model, folder, base_model_name_or_path="another/base")
    assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == "another/base"
    saved_weights = load_file(folder / "adapter_model.safetensors")
    for key, tensor in adapter_state_dict(model).items():
        assert_close(saved_weights[key], tensor, rtol=0, atol=0)
    assert sorted(path.name for path in folder.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [path.name for path in folder.parent.iterdir()] == [folder.name]


def test_saving_where_a_file_is_is_a_one_line_error(tiny, tmp_path):
    inject_lora(tiny)
    (tmp_path / "adapter").write_text("not a folder")
    with pytest.raises(NotADirectoryError, match=r"adapter is a file, not a folder; remove it or choose another"):
        save_adapter(tiny, tmp_path / "adapter")
    assert (tmp_path / "adapter").read_text() == "not a folder"


def test_saving_into_a_folder_with_other_files_is_refused_and_deletes_nothing(tiny, tmp_path):
    inject_lora(tiny)
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"holds notes\.txt, not only an adapter; .* choose a new or empty one"):
        save_adapter(tiny, tmp_path)
    assert [path.name for path in tmp_path.iterdir()] == ["notes.txt"]


def test_loading_never_unpickles(tiny, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    inject_lora(tiny)
    folder = save_adapter(tiny, tmp_path / "adapter")
    (folder / "adapter_model.safetensors").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(ValueError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(fresh_like(tiny), folder)
    assert not marker.exists()


def test_missing_folder_is_a_one_line_error(tiny, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nowhere/adapter_config\.json: no such file"):
        load_adapter(tiny, tmp_path / "nowhere")


def test_missing_weights_file_is_named(saved):
    model, folder = saved
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"adapter_model\.safetensors: no such file"):
        load_adapter(fresh_like(model), folder)


def test_missing_tensor_is_named(saved):
    model, folder = saved
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"
    del tensors[key]
    save_file(tensors, folder / "adapter_model.safetensors")
    fresh = fresh_like(model)
    with pytest.raises(ValueError, match=f"missing tensor {key}"):
        load_adapter(fresh, folder)
    assert not list(lora_layers(fresh))  # nothing was injected


def test_unexpected_tensor_is_named(saved):
    model, folder = saved
    tensors = load_file(folder / "adapter_model.safetensors")
    key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    tensors[key] = torch.zeros(4, 64)
    save_file(tensors, folder / "adapter_model.safetensors")
    with pytest.raises(ValueError, match=f"unexpected tensor {key}"):
        load_adapter(fresh_like(model), folder)


def test_shape_that_does_not_fit_is_named(saved):
    model, folder = saved
    fresh = fresh_like(model)
    inject_lora(fresh, r=8, alpha=8)
    before = {name: layer.lora_A.weight.clone() for name, layer in lora_layers(fresh)}
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    with pytest.raises(ValueError, match=rf"tensor {key} has shape \(4, 64\) but the model needs \(8, 64\)"):
        load_adapter(fresh, folder)
    for name, layer in lora_layers(fresh):
        assert_close(layer.lora_A.weight, before[name], rtol=0, atol=0)  # nothing was changed


def test_different_alpha_in_an_adapted_model_is_an_error(saved):
    model, folder = saved
    fresh = fresh_like(model)
    inject_lora(fresh, r=4, alpha=32)
    with pytest.raises(ValueError, match="lora_alpha is 8 but model.layers.0.self_attn.q_proj has alpha 32"):
        load_adapter(fresh, folder)


def test_malformed_config_names_the_line(saved):
    model, folder = saved
    (folder / "adapter_config.json").write_text('{\n  "r": 4,\n  "lora_alpha": \n}\n')
    with pytest.raises(ValueError, match=r"adapter_config\.json: line 4: not valid JSON"):
        load_adapter(fresh_like(model), folder)


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("peft_type", "IA3", "peft_type is 'IA3'; only 'LORA'"),
        ("fan_in_fan_out", True, "fan_in_fan_out is True; this library does not load that option"),
        ("bias", "all", "bias is 'all'"),
        ("target_modules", 3, "target_modules must be a list"),
        ("target_modules", ["q_proj", 3], "target_modules must be a list of names"),
        ("target_modules", "q_proj(", r"target_modules 'q_proj\(' is not a regular expression"),
        ("use_dora", 1, "use_dora is 1; it must be true or false"),
        ("r", 0, "adapter_config.json: r must be a positive integer"),
        ("lora_alpha", "16", "adapter_config.json: alpha must be a finite number > 0"),
    ],
)
def test_config_field_that_cannot_load_is_named(saved, field, value, message):
    model, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    config[field] = value
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        load_adapter(fresh_like(model), folder)


@pytest.mark.parametrize("text, message", [
    (b"\xff\xfe{}", "not a text file; an adapter config is JSON"),
    (b'{"r": ' + b"1" * 5000 + b"}", "JSON that Python cannot read (Exceeds the limit"),
])
def test_config_that_is_not_readable_json_is_named(saved, text, message):
    model, folder = saved
    (folder / "adapter_config.json").write_bytes(text)
    with pytest.raises(ValueError, match=re.escape(f"{folder / 'adapter_config.json'}: {message}")):
        load_adapter(fresh_like(model), folder)


def test_missing_config_field_is_named(saved):
    model, folder = saved
    config = json.loads((folder / "adapter_config.json").read_text())
    del config["lora_alpha"]
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="field 'lora_alpha' is missing"):
        load_adapter(fresh_like(model), folder)


def test_saving_a_model_without_lora_is_an_error(tiny, tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers to save; call inject_lora"):
        save_adapter(tiny, tmp_path)


def test_saving_layers_with_different_ranks_is_an_error(tiny, tmp_path):
    inject_lora(tiny, ["q_proj"], r=4)
    inject_lora(tiny, ["v_proj"], r=8)
    with pytest.raises(ValueError, match=r"different r values \[4, 8\]"):
        save_adapter(tiny, tmp_path)
