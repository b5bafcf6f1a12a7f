"""Exact-match accuracy on held-out instruction tasks: does the model give the right answer?

The embedded generated tasks (arithmetic, unit conversion, sorting, ...) each have one exact
answer, so no judge is needed: the model answers each held-out prompt greedily, and the
answer counts when it equals the expected output after trimming whitespace. The prompts are
answered ``--batch-size`` at a time, left-padded into one batch, EOS ending each answer.

A prompt is written in one of two templates (``--template``). "alpaca", the default, is the
training template (``data.template``), the one an adapter trained here learned to answer.
"chat" puts the task in the tokenizer's own chat template, the one an instruct model such as
SmolLM2-135M-Instruct was tuned on: score a base model there to see what it can do in the
format it knows.

    python -m eval.instruct --adapter runs/NAME/adapter      # adapter and base model, per task kind
    python -m eval.instruct --template chat                  # the base model in its own chat template
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
from eval.generate import format_prompt as chat_prompt
from eval.generate import generate, left_pad
from lora import disable_lora

BATCH_SIZE = 16  # prompts answered in one batch; the prompts and answers are short, so the cache is small
TEMPLATES = ("alpaca", "chat")  # the training template; the tokenizer's chat template


def check_template(tokenizer, template: str) -> None:
    """Raise ValueError (one line) unless ``tokenizer`` can write prompts in ``template``, one of ``TEMPLATES``."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown template {template!r}; choose one of {', '.join(TEMPLATES)}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("template chat: the tokenizer has no chat template; prompt in the alpaca template")


def prompt_ids(tokenizer, example: dict, template: str = "alpaca") -> list[int]:
    """The token ids ``example`` is prompted with, in ``template``.

    "alpaca": ``data.template.format_prompt(example)``, tokenized as in training.
    "chat": one user message, the instruction (then a blank line and the input, when there is
    one), in the tokenizer's chat template with the assistant's turn opened: exactly
    ``tokenizer.apply_chat_template([{"role": "user", "content": ...}], add_generation_prompt=True)``.

    Raises:
        ValueError: an unknown ``template``, or "chat" for a tokenizer that has no chat template.
    """
    check_template(tokenizer, template)
    if template == "alpaca":
        return tokenizer(format_prompt(example)).input_ids
    message = "\n\n".join(part for part in (example["instruction"], example.get("input") or "") if part)
    # The template holds the special tokens already: the tokenizer must not add its own.
    return tokenizer(chat_prompt(tokenizer, message), add_special_tokens=False).input_ids


def answers(model, tokenizer, examples: Sequence[dict], max_new_tokens: int = 32,
            template: str = "alpaca") -> list[str]:
    """The model's greedy answers to ``examples``' prompts in ``template`` (``prompt_ids``), each up to EOS,
    in one batch."""
    ids = [prompt_ids(tokenizer, example, template) for example in examples]
    input_ids, attention_mask = left_pad(ids, pad_token_id(tokenizer))
    device = next(model.parameters()).device
    new = generate(model, input_ids.to(device), max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                   attention_mask=attention_mask.to(device))
    return tokenizer.batch_decode(new, skip_special_tokens=True)


def answer(model, tokenizer, example: dict, max_new_tokens: int = 32, template: str = "alpaca") -> str:
    """The model's greedy answer to ``example``'s prompt in ``template`` (``prompt_ids``), up to EOS."""
    return answers(model, tokenizer, [example], max_new_tokens, template)[0]


def exact_match(model, tokenizer, examples: list[dict], max_new_tokens: int = 32, desc: str = "exact match",
                batch_size: int = BATCH_SIZE, template: str = "alpaca") -> dict[str, float]:
    """Accuracy per ``kind`` (records without one count as "all") and overall, under key "overall".

    The examples are answered ``batch_size`` at a time (``answers``), prompted in ``template``:
    "alpaca" (the training template) or "chat" (the tokenizer's chat template; ``prompt_ids``).
    """
    right, total = defaultdict(int), defaultdict(int)
    with tqdm(total=len(examples), desc=desc, unit="task", dynamic_ncols=True) as progress:
        for start in range(0, len(examples), batch_size):
            batch = examples[start : start + batch_size]
            for example, text in zip(batch, answers(model, tokenizer, batch, max_new_tokens, template)):
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
    parser.add_argument("--template", choices=TEMPLATES, default="alpaca",
                        help="prompt in the training template or in the tokenizer's chat template (%(default)s)")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
        test = task_split("instruct", "test", args.data)[: args.limit]
        model, tokenizer = load_model_and_adapter(args)
        check_template(tokenizer, args.template)
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
                                            batch_size=args.batch_size, template=args.template)
    counts = Counter(example.get("kind", "all") for example in test)
    counts["overall"] = len(test)
    print(f"exact match on {len(test)} held-out tasks ({held_dtype(model)}, {args.template} template)")
    print("| kind | tasks | " + " | ".join(results) + " |")
    print("| --- | --- |" + " --- |" * len(results))
    for kind in next(iter(results.values())):
        print(f"| {kind} | {counts[kind]} | " + " | ".join(f"{result[kind]:.0%}" for result in results.values()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
