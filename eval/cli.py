"""What every ``python -m eval.<name>`` command shares: ``--model`` and ``--adapter``, loaded one way."""

import argparse

import torch

from lora import load_adapter
from models.loader import EMBEDDED, load_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model`` (default: the embedded model) and ``--adapter`` (default: none, the base model)."""
    parser.add_argument("--model", default=EMBEDDED,
                        help="model name, Hugging Face id or local folder; nothing is downloaded (%(default)s)")
    parser.add_argument("--adapter", help="an adapter folder (save_adapter or peft); default: the base model only")


def load_model_and_adapter(args: argparse.Namespace):
    """``load_model(args.model)``, with ``args.adapter`` loaded into it when given, on the GPU when there is one.

    Returns:
        ``(model, tokenizer)``.

    Raises:
        FileNotFoundError, ValueError: as ``load_model`` and ``load_adapter`` do (an unknown model,
            a missing adapter file, an adapter saved for another model); each message is one line.
    """
    model, tokenizer = load_model(args.model)
    if args.adapter:
        load_adapter(model, args.adapter)
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), tokenizer
