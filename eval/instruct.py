"""Exact-match accuracy on held-out instruction tasks: does the model give the right answer?

The embedded generated tasks (arithmetic, unit conversion, sorting, ...) each have one exact
answer, so no judge is needed: the model answers each held-out prompt greedily, and the
answer counts when it equals the expected output after trimming whitespace. The prompts are
answered ``--batch-size`` at a time, left-padded into one batch, EOS ending each answer.

    python -m eval.instruct --adapter runs/NAME/adapter      # adapter and base model, per task kind
"""

import argparse
import sys
from collections import Counter, defaultdict
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from tqdm import tqdm

from data.sequences import pad_token_id
from data.tasks import task_split
from data.template import format_prompt
from eval.cli import add_model_arguments, held_dtype, load_model_and_adapter
from eval.generate import generate, left_pad
from lora import disable_lora

BATCH_SIZE = 16  # prompts answered in one batch; the prompts and answers are short, so the cache is small


def answers(model, tokenizer, examples: Sequence[dict], max_new_tokens: int = 32) -> list[str]:
    """The model's greedy answers to ``examples``' prompts (the training template), each up to EOS, in one batch."""
    ids = [tokenizer(format_prompt(example)).input_ids for example in examples]
    input_ids, attention_mask = left_pad(ids, pad_token_id(tokenizer))
    device = next(model.parameters()).device
    new = generate(model, input_ids.to(device), max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                   attention_mask=attention_mask.to(device))
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def answer(model, tokenizer, example: dict, max_new_tokens: int = 32) -> str:
    """The model's greedy answer to ``example``'s prompt (the training template), up to EOS."""
    return answers(model, tokenizer, [example], max_new_tokens)[0]


def exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int = 32, desc: str = "exact match",
                batch_size: int = BATCH_SIZE) -> dict[str, float]:
    """Accuracy per ``kind`` (records without one count as "all") and overall, under key "overall".

    The examples are answered ``batch_size`` at a time (``answers``).
    """
    right, total = defaultdict(int), defaultdict(int)
    with tqdm(total=len(examples), desc=desc, unit="task", dynamic_ncols=True) as progress:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            for example, text in zip(batch, answers(model, tokenizer, batch, max_new_tokens)):
                kind = example.get("kind", "all")
                right[kind] += text.strip() == example["output"].strip()
                total[kind] += 1
            progress.update(len(batch))
    accuracy = {kind: right[kind] / total[kind] for kind in sorted(total)}
    accuracy["overall"] = sum(right.values()) / sum(total.values())
    return accuracy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.instruct", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--data", help="Alpaca .json/.jsonl; default: the embedded generated tasks")
    parser.add_argument("--limit", type=int, default=80, help="held-out examples to answer (%(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="(%(default)s)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="prompts answered at once (%(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        test = task_split("instruct", "test", args.data)[: args.limit]
        model, tokenizer = load_model_and_adapter(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    columns = {"adapter": nullcontext, "base model": lambda: disable_lora(model)} if args.adapter else \
        {"base model": nullcontext}
    results = {}
    with torch.no_grad():
        for name, switch in columns.items():
            with switch():
                results[name] = exact_match(model, tokenizer, test, args.max_new_tokens, desc=name,
                                            batch_size=args.batch_size)
    counts = Counter(example.get("kind", "all") for example in test)
    counts["overall"] = len(test)
    print(f"exact match on {len(test)} held-out tasks ({held_dtype(model)})")
    print("| kind | tasks | " + " | ".join(results) + " |")
    print("| --- | --- |" + " --- |" * len(results))
    for kind in next(iter(results.values())):
        print(f"| {kind} | {counts[kind]} | " + " | ".join(f"{result[kind]:.0%}" for result in results.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
