"""Inference with an adapter: the base model, LoRA un-merged, LoRA merged into W.

Two workloads, each variant interleaved with the others in one process after a warm-up:
a forward pass over a batch of prompts (prefill), and greedy decoding of new tokens one at a
time with the KV cache (``eval.generate``). Merged, the model is the base model with other
numbers in W, so it should cost the same; un-merged, every adapted layer adds its two thin
matmuls and an add.

Beside our decoding loop, transformers' ``model.generate`` decodes the same prompt from the same
model in the same rounds: greedy, the same number of new tokens (``min_new_tokens`` keeps it
from stopping at an EOS earlier), in the same dtype. Its tokens per second say what our
loop, written for reading, costs against the library's.

    python -m benchmarks.inference                  # the embedded model, 4 x 256 prefill, 32 decoded tokens
    python -m benchmarks.inference --precision bf16 # the model held in bf16, as the eval commands hold it
"""

import argparse
import copy
import statistics
import sys
from functools import partial

import torch

from benchmarks.lora_step import RANDOM_SHAPES, load_benchmark_model, paired_ratio, timed
from eval.generate import generate
from lora import cast_frozen, inject_lora, lora_layers, merge_lora, parse_targets
from models.loader import EMBEDDED

VARIANTS = ("base", "un-merged", "merged")


def interleaved(runs: dict, steps: int, device: str) -> dict[str, list[float]]:
    """Seconds of each of ``runs`` (name -> function) in each of ``steps`` rounds, after one warm-up call each.

    Each round runs every function once, starting from a different one each round, so that none
    always runs first (on a cache the others have not warmed, or a CPU they have not heated).
    """
    for run in runs.values():
        run()  # warm-up
    names = list(runs)
    seconds = {name: [] for name in names}
    for step in range(steps):
        for name in names[step % len(names):] + names[:step % len(names)]:  # none always first
            seconds[name].append(timed(runs[name], device))
    return seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.inference", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED, help=f"a name load_model knows or {', '.join(RANDOM_SHAPES)} "
                        "(%(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="prompts in the prefill batch (%(default)s)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per prompt (%(default)s)")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens decoded (%(default)s)")
    parser.add_argument("--r", type=int, default=8, help="(%(default)s)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="(%(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="bf16: the frozen base held in bf16, as the eval commands hold it (%(default)s)")
    parser.add_argument("--steps", type=int, default=12, help="timed rounds; the median is reported (%(default)s)")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"

    base = load_benchmark_model(args.model)
    base.to(device).eval()
    cast_frozen(base.requires_grad_(False), torch.bfloat16 if args.precision == "bf16" else torch.float32)
    adapted = copy.deepcopy(base)
    inject_lora(adapted, parse_targets(args.targets), r=args.r, alpha=2 * args.r)
    torch.manual_seed(0)
    for _, layer in lora_layers(adapted):
        torch.nn.init.normal_(layer.lora_B.weight, std=0.01)
    merged = merge_lora(copy.deepcopy(adapted))
    models = dict(zip(VARIANTS, (base, adapted, merged)))

    generator = torch.Generator().manual_seed(0)
    prompts = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=generator).to(device)

    def prefill(model):
        with torch.no_grad():
            model(input_ids=prompts)

    def decode(model):
        return generate(model, prompts[:1, :32], args.new_tokens)

    def decode_with_transformers(model):
        prompt = prompts[:1, :32]
        return model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              pad_token_id=0)[:, prompt.shape[1]:]

    name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.model} on {device} ({name}), {args.precision}; LoRA r={args.r} on {args.targets}; "
          f"median of {args.steps} interleaved rounds after one warm-up round; ratios are medians of the "
          "ratios within a round")
    prefill_s = interleaved({variant: partial(prefill, model) for variant, model in models.items()}, args.steps,
                            device)
    theirs = {variant: f"{variant}, transformers" for variant in models}
    decode_s = interleaved({**{variant: partial(decode, model) for variant, model in models.items()},
                            **{theirs[variant]: partial(decode_with_transformers, model)
                               for variant, model in models.items()}}, args.steps, device)
    same = all(torch.equal(decode(model), decode_with_transformers(model)) for model in models.values())

    print(f"| variant | prefill {args.batch} x {args.seq}, s | / base | decode {args.new_tokens} tokens, s | / base "
          "| tokens/s | transformers generate, tokens/s | / transformers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for variant in models:
        decode_median = statistics.median(decode_s[variant])
        theirs_median = statistics.median(decode_s[theirs[variant]])
        print(f"| {variant} | {statistics.median(prefill_s[variant]):.3f} | "
              f"{paired_ratio(prefill_s, variant, 'base'):.3f} | {decode_median:.3f} | "
              f"{paired_ratio(decode_s, variant, 'base'):.3f} | {args.new_tokens / decode_median:.1f} | "
              f"{args.new_tokens / theirs_median:.1f} | {paired_ratio(decode_s, variant, theirs[variant]):.3f} |")
    print(f"\nDecoding: batch 1, a {min(32, args.seq)}-token prompt (its prefill counted in), greedy. eval.generate "
          f"and transformers' generate wrote the same tokens: {'yes' if same else 'no'}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
