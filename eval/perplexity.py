"""Perplexity: how surprised the model is by text, token by token.

    perplexity = exp( mean over predicted tokens of  -log p(token | the tokens before it) )

A perplexity of k means the model is, on average, as unsure as a uniform choice among k
tokens. Only labelled tokens count: padding (label -100) never does, and for *conditional*
perplexity neither does the prompt, so an instruction example is scored on its answer given
its prompt, as it was trained.

    python -m eval.perplexity --task instruct --adapter runs/NAME/adapter
    python -m eval.perplexity --task llmtime                 # the base model on held-out systems
"""

import argparse
import math
import sys

import torch

from data.collate import PadCollator
from data.sequences import IGNORE_INDEX, pad_token_id
from data.tasks import series_texts, task_split, windows
from data.tokenization import tokenize_examples
from eval.cli import add_model_arguments, load_model_and_adapter
from eval.mode import eval_mode
from models.loss import label_tokens, summed_token_nll
from models.precision import FP32, Precision


def unconditional(example: dict) -> dict:
    """The example with every real token labelled (the prompt too); padding stays -100."""
    ids, mask = torch.as_tensor(example["input_ids"]), torch.as_tensor(example["attention_mask"])
    return {**example, "labels": torch.where(mask.bool(), ids, IGNORE_INDEX)}


@torch.no_grad()
def summed_nll(model, examples: list[dict], pad_id: int, batch_size: int = 8,
               precision: Precision = FP32) -> tuple[float, int]:
    """``(summed -log p, label tokens)`` over ``examples``, ``batch_size`` at a time, in eval mode.

    Sums, so that parts scored apart (by several processes, say: ``training/loop.py``) add up to
    the whole: the loss is ``total / tokens`` whichever way the examples were split.
    """
    collate = PadCollator(pad_id)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = {key: value.to(device) for key, value in collate(examples[start : start + batch_size]).items()}
            total += summed_token_nll(model, batch, precision).item()
            count += label_tokens(batch)
    return total, count


def perplexity(model, examples: list[dict], pad_id: int, batch_size: int = 8, conditional: bool = True,
               precision: Precision = FP32) -> dict:
    """Perplexity of ``model`` over ``examples`` (dicts of input_ids, attention_mask, labels).

    Args:
        conditional: True scores only the labelled tokens (for instruction examples, the
            answer given the prompt); False scores every real token, prompt included.
        precision: the dtype the matmuls run in (``models.precision``); fp32 by default.

    Returns:
        ``{"loss": mean negative log-likelihood per token, "perplexity": exp(loss), "tokens": count}``.
        The mean is over tokens, not over batches, so the batch size does not change it.
    """
    if not examples:
        raise ValueError("no examples to score")
    if not conditional:
        examples = [unconditional(example) for example in examples]
    total, count = summed_nll(model, examples, pad_id, batch_size, precision)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


def held_out_examples(task: str, tokenizer, data: str | None, max_length: int) -> list[dict]:
    """The test part of a task (``data.tasks.task_split``), tokenized: windows of held-out systems, or records."""
    test = task_split(task, "test", data)
    if task == "llmtime":
        return windows(series_texts(test), tokenizer, max_length, max_length // 2)
    return tokenize_examples(test, tokenizer, max_length)[0]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.perplexity", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--task", choices=("llmtime", "instruct"), default="llmtime", help="(%(default)s)")
    parser.add_argument("--data", help="llmtime: a .npz; instruct: .json/.jsonl; default: the embedded data")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per example (%(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="(%(default)s)")
    parser.add_argument("--limit", type=int, default=64, help="score the first N held-out examples (%(default)s)")
    parser.add_argument("--unconditional", action="store_true", help="score the prompt tokens too")
    args = parser.parse_args(argv)
    try:
        model, tokenizer = load_model_and_adapter(args)
        examples = held_out_examples(args.task, tokenizer, args.data, args.max_length)[: args.limit]
        result = perplexity(model, examples, pad_token_id(tokenizer), args.batch_size,
                            conditional=not args.unconditional)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    kind = "unconditional" if args.unconditional else "conditional"
    print(f"{args.task} test, {len(examples)} examples, {result['tokens']:,} tokens ({kind}): "
          f"loss {result['loss']:.4f}, perplexity {result['perplexity']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
