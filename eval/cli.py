"""What every ``python -m eval.<name>`` command shares: ``--model``, ``--adapter``, ``--precision``, loaded one way."""

import argparse

import torch

from lora import load_adapter
from models.loader import EMBEDDED, load_model
from models.precision import choose_precision


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model`` (default: the embedded model), ``--adapter`` (default: none) and ``--precision`` (auto)."""
    parser.add_argument("--model", default=EMBEDDED,
                        help="model name, Hugging Face id or local folder; nothing is downloaded (%(default)s)")
    parser.add_argument("--adapter", help="an adapter folder (save_adapter or peft); default: the base model only")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                        help="the dtype the model is held and run in; auto: bf16 where the device computes it "
                             "natively, else fp32 (%(default)s)")


def load_model_and_adapter(args: argparse.Namespace):
    """``load_model(args.model)`` in ``args.precision``'s dtype, with ``args.adapter`` loaded into it when given,
    on the GPU when there is one.

    Nothing trains here, so the whole model, LoRA's A and B too (``load_adapter`` gives them the
    base weight's dtype), is held in the compute dtype: every matmul runs in it without autocast
    casting the same frozen weights again at every call.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError, ValueError: as ``load_model`` and ``load_adapter`` do (an unknown model,
            a missing adapter file, an adapter saved for another model); each message is one line.
    """
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = choose_precision(args.precision, device)
    model, tokenizer = load_model(args.model, dtype=precision.base_dtype)
    if args.adapter:
        load_adapter(model, args.adapter)
    return model.to(device), tokenizer


def held_dtype(model) -> str:
    """The dtype ``model`` is held in, as ``--precision`` resolved: ``bfloat16``, ``float32``."""
    return str(next(model.parameters()).dtype).removeprefix("torch.")
