"""Exact-match accuracy on held-out instruction tasks: does the model give the right answer?

The embedded generated tasks (arithmetic, unit conversion, sorting, ...) each have one exact
answer, so no judge is needed: the model answers each held-out prompt greedily, and the
answer counts when it equals the expected output after trimming whitespace.

    python -m eval.instruct --adapter runs/NAME/adapter      # adapter and base model, per task kind
"""

import argparse
import sys
from collections import Counter, defaultdict
from contextlib import nullcontext

import torch
from tqdm import tqdm

from data.tasks import task_split
from data.template import format_prompt
from eval.cli import add_model_arguments, load_model_and_adapter
from eval.generate import generate
from lora import disable_lora


def answer(model, tokenizer, example: dict, max_new_tokens: int = 32) -> str:
    """The model's greedy answer to ``example``'s prompt (the training template), up to EOS."""
    input_ids = tokenizer(format_prompt(example), return_tensors="pt").input_ids
    new = generate(model, input_ids.to(next(model.parameters()).device), max_new_tokens,
                   eos_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(new[0], skip_special_tokens=True)


def exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int = 32,
                desc: str = "exact match") -> dict[str, float]:
    """Accuracy per ``kind`` (records without one count as "all") and overall, under key "overall"."""
    right, total = defaultdict(int), defaultdict(int)
    for example in tqdm(examples, desc=desc, dynamic_ncols=True):
        kind = example.get("kind", "all")
        correct = answer(model, tokenizer, example, max_new_tokens).strip() == example["output"].strip()
        right[kind] += correct
        total[kind] += 1
    accuracy = {kind: right[kind] / total[kind] for kind in sorted(total)}
    accuracy["overall"] = sum(right.values()) / sum(total.values())
    return accuracy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.instruct", description=__doc__.split("\n\n")[0])
    add_model_arguments(parser)
    parser.add_argument("--data", help="Alpaca .json/.jsonl; default: the embedded generated tasks")
    parser.add_argument("--limit", type=int, default=80, help="held-out examples to answer (%(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="(%(default)s)")
    args = parser.parse_args(argv)
    try:
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
                results[name] = exact_match(model, tokenizer, test, args.max_new_tokens, desc=name)
    counts = Counter(example.get("kind", "all") for example in test)
    counts["overall"] = len(test)
    print(f"exact match on {len(test)} held-out tasks")
    print("| kind | tasks | " + " | ".join(results) + " |")
    print("| --- | --- |" + " --- |" * len(results))
    for kind in next(iter(results.values())):
        print(f"| {kind} | {counts[kind]} | " + " | ".join(f"{result[kind]:.0%}" for result in results.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
