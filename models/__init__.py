"""The models to fine-tune and how they compute: the loader (embedded SmolLM2, tiny test models,
Hugging Face ids or folders on disk), the precision choice and the next-token loss (``models.loss``).
Below ``eval`` and ``training``, beside ``data``: it imports neither (setup.cfg's import contract)."""

from models.loader import EMBEDDED, char_tokenizer, load_config, load_model, load_tokenizer, tiny_model
from models.precision import Precision, choose_precision, cpu_supports_bf16

__all__ = [
    "EMBEDDED",
    "Precision",
    "char_tokenizer",
    "choose_precision",
    "cpu_supports_bf16",
    "load_config",
    "load_model",
    "load_tokenizer",
    "tiny_model",
]
