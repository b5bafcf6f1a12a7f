"""Serving N adapters on one base: one mixed batch, N separate batches, or merging each in turn.

N requests arrive, each for its own adapter (``lora/named.py``; ranks cycle through ``--ranks``,
so the mixed batch pads them to the largest). Each request is a prompt to continue greedily by
``--new-tokens`` tokens. Three ways to serve them:

- mixed: one batch of N rows, each row through its own adapter (``lora/mixed.py``:
  ``generate(..., adapter_names=...)``): the base's matmuls run once on all N rows.
- separate: for each request, ``set_adapter`` and a batch of one row, adapter un-merged.
- merged: for each request, ``set_adapter``, merge it into W, a batch of one row, unmerge:
  no adapter cost in the forward, but W rewritten twice per request.

The three run interleaved after a warm-up, as ``benchmarks.inference`` runs its variants; the
time is the median over rounds of serving all N requests, and every way must write the same
tokens (greedy). Stacking the adapters for the mixed batch is done once per ``mixed_batch``
block, so it is inside the mixed time.

    python -m benchmarks.adapters                      # the embedded model, N = 2, 8, 32
    python -m benchmarks.adapters --counts 2,8 --steps 3
"""

import argparse
import statistics
import sys
from functools import partial

import torch

from benchmarks.inference import interleaved
from benchmarks.lora_step import RANDOM_SHAPES, load_benchmark_model, paired_ratio
from eval.generate import generate
from lora import add_adapter, merge_lora, parse_targets, set_adapter, unmerge_lora
from lora.named import adapter_layers
from models.loader import EMBEDDED

WAYS = ("mixed", "separate", "merged")


def add_random_adapters(model, count: int, ranks: list[int], targets: list[str]) -> list[str]:
    """Add ``count`` adapters named ``adapter-0`` ... to ``model``, ranks cycling through ``ranks``, B random."""
    names = [f"adapter-{index}" for index in range(count)]
    generator = torch.Generator().manual_seed(0)
    for index, name in enumerate(names):
        r = ranks[index % len(ranks)]
        add_adapter(model, name, target_modules=targets, r=r, alpha=2 * r)
        with torch.no_grad():
            for layer in adapter_layers(model, name).values():
                layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=generator) * 0.01)
    return names


def serve_mixed(model, prompts, names, new_tokens):
    return generate(model, prompts, new_tokens, adapter_names=names)


def serve_separate(model, prompts, names, new_tokens):
    rows = []
    for row, name in enumerate(names):
        set_adapter(model, name)
        rows.append(generate(model, prompts[row:row + 1], new_tokens))
    return torch.cat(rows)


def serve_merged(model, prompts, names, new_tokens):
    rows = []
    for row, name in enumerate(names):
        set_adapter(model, name)
        merge_lora(model)
        rows.append(generate(model, prompts[row:row + 1], new_tokens))
        unmerge_lora(model)
    return torch.cat(rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.adapters", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED, help=f"a name load_model knows or {', '.join(RANDOM_SHAPES)} "
                        "(%(default)s)")
    parser.add_argument("--counts", default="2,8,32", help="numbers of adapters, one request each (%(default)s)")
    parser.add_argument("--ranks", default="4,8,16", help="the adapters' ranks, in turn (%(default)s)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="(%(default)s)")
    parser.add_argument("--prompt", type=int, default=32, help="tokens per prompt (%(default)s)")
    parser.add_argument("--new-tokens", type=int, default=16, help="greedy tokens per request (%(default)s)")
    parser.add_argument("--steps", type=int, default=3, help="timed rounds; the median is reported (%(default)s)")
    args = parser.parse_args(argv)
    counts, ranks = [int(n) for n in args.counts.split(",")], [int(r) for r in args.ranks.split(",")]
    device = "cuda" if torch.cuda.is_available() else "cpu"

    model = load_benchmark_model(args.model).to(device).eval().requires_grad_(False)
    names = add_random_adapters(model, max(counts), ranks, parse_targets(args.targets))
    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, model.config.vocab_size, (max(counts), args.prompt), generator=generator).to(device)

    name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.model} on {device} ({name}), float32; adapters on {args.targets}, r cycling {args.ranks}; each "
          f"request a {args.prompt}-token prompt and {args.new_tokens} greedy tokens; median of {args.steps} "
          "interleaved rounds after a warm-up round; ratios are medians of the ratios within a round")
    print("| N adapters | way | s for N requests | tokens/s | / mixed |")
    print("| --- | --- | --- | --- | --- |")
    same = True
    for count in counts:
        ways = {way: partial(serve, model, prompts[:count], names[:count], args.new_tokens)
                for way, serve in zip(WAYS, (serve_mixed, serve_separate, serve_merged))}
        tokens = {way: run() for way, run in ways.items()}
        same &= all(torch.equal(tokens[way], tokens["mixed"]) for way in WAYS)
        seconds = interleaved(ways, args.steps, device)
        for way in WAYS:
            median = statistics.median(seconds[way])
            print(f"| {count} | {way} | {median:.3f} | {count * args.new_tokens / median:.1f} | "
                  f"{paired_ratio(seconds, way, 'mixed'):.2f} |")
    print(f"\nThe three ways wrote the same tokens for every request: {'yes' if same else 'no'}.")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
