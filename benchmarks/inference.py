"""Inference with an adapter: the base model, LoRA un-merged, LoRA merged into W.

Two workloads, each variant interleaved with the others in one process after a warm-up:
a forward pass over a batch of prompts (prefill), and greedy decoding of new tokens one at a
time with the KV cache (``eval.generate``). Merged, the model is the base model with other
numbers in W, so it should cost the same; un-merged, every adapted layer adds its two thin
matmuls and an add.

    python -m benchmarks.inference                  # the embedded model, 4 x 256 prefill, 32 decoded tokens
"""

import argparse
import copy
import statistics
import sys

import torch

from benchmarks.lora_step import RANDOM_SHAPES, load_benchmark_model, paired_ratio, timed
from eval.generate import generate
from lora import inject_lora, lora_layers, merge_lora, parse_targets
from models.loader import EMBEDDED

VARIANTS = ("base", "un-merged", "merged")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED, help=f"a name load_model knows or {', '.join(RANDOM_SHAPES)} "
                        "(%(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="prompts in the prefill batch (%(default)s)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per prompt (%(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded (%(default)s)")
    parser.add_argument("--r", type=int, default=8, help="(%(default)s)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="(%(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (%(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="timed rounds; the median is reported (%(default)s)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    base = load_benchmark_model(args.model)
    base.to(device).eval()
    adapted = copy.deepcopy(base)
    inject_lora(adapted, parse_targets(args.targets), r=args.r, alpha=2 * args.r)
    torch.manual_seed(0)
    for _, layer in lora_layers(adapted):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.01)
    merged = merge_lora(copy.deepcopy(adapted))
    models = {"base": base, "un-merged": adapted, "merged": merged}

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=generator).to(device)
    bf16 = args.precision == "bf16"

    def prefill(model):
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            model(input_ids=prompts)

    def decode(model):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            generate(model, prompts[:1, :32], args.new_tokens)

    name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.model} on {device} ({name}), {args.precision}; LoRA r={args.r} on {args.targets}; "
          f"median of {args.steps} interleaved rounds after one warm-up round; ratios are medians of the "
          "ratios within a round")
    results = {}
    for workload, run in (("prefill", prefill), ("decode", decode)):
        for model in models.values():
            run(model)  # warm-up
        seconds = {variant: [] for variant in models}
        for step in range(args.steps):
            order = VARIANTS[step % len(VARIANTS):] + VARIANTS[:step % len(VARIANTS)]  # none always first
            for variant in order:
                seconds[variant].append(timed(lambda: run(models[variant]), device))
        results[workload] = {variant: (statistics.median(times), paired_ratio(seconds, variant, "base"))
                             for variant, times in seconds.items()}

    print(f"| variant | prefill {args.batch} x {args.seq}, s | / base | decode {args.new_tokens} tokens, s | / base |")
    print("| --- | --- | --- | --- | --- |")
    for variant in models:
        (prefill_s, prefill_ratio), (decode_s, decode_ratio) = results["prefill"][variant], results["decode"][variant]
        print(f"| {variant} | {prefill_s:.3f} | {prefill_ratio:.3f} | {decode_s:.3f} | {decode_ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
