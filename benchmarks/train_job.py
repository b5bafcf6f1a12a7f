"""The default training job three ways: the loop without its speed-ups, as written, and peft as a user runs it.

The same short job (the default settings' model, data and batches; the first ``--steps``
optimizer steps) runs three ways, a step of each in turn, so a slow minute on a shared machine
slows them all alike:

- before: the loop without its speed-ups, the baseline they are measured against: the frozen base
  in fp32, cast to bf16 by autocast at every matmul, and the loss from the whole batch's fp32 logits;
- now: the loop as written (``training/loop.py``): the frozen base held in bf16, A and B in fp32,
  autocast on, the loss a chunk of tokens at a time (``models/loss.py``);
- peft-bf16: what a user would pick instead: Hugging Face peft on the model loaded in bf16 (the
  usual choice), its default fp32 adapters (``autocast_adapter_dtype``), bf16 autocast, and a
  minimal PyTorch loop (forward with ``labels``, backward, clip, AdamW).

Each reports tokens per second and MFU: the matmul FLOPs of the steps (``eval/flops.py``) per
second, over the rate of a bf16 2048 x 2048 matmul measured in the same run. Peak memory is
measured for each alone, in a fresh process, over a few steps.

    python -m benchmarks.train_job                  # the embedded model, 20 steps each
    python -m benchmarks.train_job --no-memory      # without the three extra processes
    python -m benchmarks.train_job --variants now,now-full-logits,now-eager-attention,now-compiled --no-memory
    python -m benchmarks.train_job --profile        # and where a step of now goes
    python -m benchmarks.train_job --model tiny-llama --steps 2 --matmul-size 256 --no-memory  # a check in seconds

Every variant runs in bf16 whatever the machine; where bf16 is not native
(``models.precision.cpu_supports_bf16``) the comparison says little about what the loop, which
then runs in fp32, would do there; and an emulated bf16 matmul is so slow there that measuring the
2048 x 2048 one's rate takes minutes, which a smaller ``--matmul-size`` saves.
"""

import argparse
import json
import statistics
import sys
import time

import torch

from benchmarks.lora_step import in_fresh_process, peak_memory_gb, timed
from data.collate import PadCollator
from data.sequences import pad_token_id
from data.tasks import build_task
from lora import inject_lora
from models.loader import load_model, load_tokenizer
from models.loss import CHUNK_TOKENS, label_tokens, summed_token_nll
from models.precision import Precision
from training import loop
from training.config import TrainConfig

VARIANTS = ("before", "now", "peft-bf16")
# Ablations of "now", one change undone or one thing tried each (--variants): the loss from the whole
# batch's logits; transformers' eager attention instead of SDPA; the model under torch.compile.
ABLATIONS = ("now-full-logits", "now-eager-attention", "now-compiled")
BF16 = Precision(torch.bfloat16)


def build(variant: str, config: TrainConfig):
    """``(model, step)`` for ``variant``: ``step(batch)`` runs one optimizer step on one micro-batch."""
    torch.manual_seed(config.seed)
    if variant == "peft-bf16":
        from peft import LoraConfig, get_peft_model

        base, _ = load_model(config.model, torch.bfloat16)
        base.config.use_cache = False
        model = get_peft_model(base, LoraConfig(r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout,
                                                target_modules=config.target_modules))
    else:
        base_dtype = torch.float32 if variant == "before" else BF16.base_dtype
        model, _ = load_model(config.model, base_dtype)
        model.config.use_cache = False
        inject_lora(model, config.target_modules, r=config.r, alpha=config.alpha, dropout=config.dropout,
                    adapter_dtype=torch.float32)
        if variant == "now-eager-attention":
            model.set_attn_implementation("eager")
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    forward = torch.compile(model) if variant == "now-compiled" else model
    chunk_tokens = 0 if variant in ("before", "now-full-logits") else CHUNK_TOKENS  # 0: the whole batch's logits

    def step(batch: dict) -> None:
        if variant == "peft-bf16":
            with torch.autocast(batch["input_ids"].device.type, dtype=torch.bfloat16):
                loss = model(**batch).loss  # transformers' own mean over the labelled tokens
        else:
            loss = summed_token_nll(forward, batch, BF16, chunk_tokens) / max(label_tokens(batch), 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return model, step


def profile_step(step, batches: list[dict], rows: int = 12) -> None:
    """Print where ``step``'s time goes over ``batches``: ``torch.profiler``'s operators by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        for batch in batches:
            step(batch)
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


def job_batches(config: TrainConfig, steps: int) -> list[dict]:
    """The micro-batches of the default job's first ``steps`` optimizer steps (``grad_accum`` 1), collated."""
    tokenizer = load_tokenizer(config.model)
    data = build_task(config, tokenizer)
    plan = loop.step_plan([len(example["input_ids"]) for example in data.train], config.batch_size, 1, config.seed)
    collate = PadCollator(pad_token_id(tokenizer))
    return [collate([data.train[i] for i in plan(step)[0][1]]) for step in range(steps)]


def bf16_matmul_rate(m: int = 2048, k: int = 2048, n: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of an ``(m, k) @ (k, n)`` bf16 matmul on this machine: the best of ``repeats`` after a warm-up."""
    generator = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=generator).bfloat16(), torch.randn(k, n, generator=generator).bfloat16()
    a @ b
    best = min(timed(lambda: a @ b, "cpu") for _ in range(repeats))
    return 2 * m * k * n / best


def child_memory(variant: str, config: TrainConfig, steps: int) -> None:
    """Load ``variant`` alone, run ``steps`` steps, print its peak resident memory as JSON."""
    model, step = build(variant, config)
    for batch in job_batches(config, steps):
        step(batch)
    print(json.dumps({"variant": variant, "peak_gb": peak_memory_gb("cpu")}))


def peak_memory(config: TrainConfig, steps: int, variants: tuple[str, ...]) -> dict[str, float]:
    """Peak memory in GB of each variant alone in a fresh process."""
    return {variant: in_fresh_process([sys.executable, "-m", "benchmarks.train_job", "--child-memory", variant,
                                       "--model", config.model, "--memory-steps", str(steps)])["peak_gb"]
            for variant in variants}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_job", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=TrainConfig.model, help="(%(default)s)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps of each variant (%(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps of each first (%(default)s)")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each alone for peak memory (%(default)s)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated, from {', '.join(VARIANTS + ABLATIONS)} (%(default)s)")
    parser.add_argument("--profile", action="store_true", help="also print where a step of now goes")
    parser.add_argument("--matmul-size", type=int, default=2048,
                        help="side of the square bf16 matmul whose rate MFU is measured against (%(default)s)")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = TrainConfig(model=args.model)
    if args.child_memory:
        child_memory(args.child_memory, config, args.memory_steps)
        return 0

    variants = tuple(args.variants.split(","))
    if args.profile and "now" not in variants:
        parser.error("--profile profiles the variant now: include it in --variants")
    for variant in variants:
        if variant not in VARIANTS + ABLATIONS:
            parser.error(f"--variants: unknown {variant!r}; choose from {', '.join(VARIANTS + ABLATIONS)}")
    batches = job_batches(config, args.warmup + args.steps)
    built = {variant: build(variant, config) for variant in variants}
    reference = next(iter(built.values()))[0]
    count_flops = loop.flop_counter(reference, config.max_length)
    size = args.matmul_size
    rate = bf16_matmul_rate(size, size, size)
    model_config = reference.config  # the model's own widest product: a step's tokens through its MLP
    tokens_per_step = config.batch_size * config.max_length
    shape_rate = bf16_matmul_rate(tokens_per_step, model_config.hidden_size, model_config.intermediate_size)
    print(f"{config.model}, the default job's first {args.steps} steps ({config.batch_size} x up to "
          f"{config.max_length} tokens, LoRA r={config.r} on {config.targets}) on {torch.get_num_threads()} CPU "
          f"threads; bf16 {size} x {size} matmul: {rate / 1e9:.0f} GFLOP/s; after {args.warmup} warm-up steps each, "
          "a step of each variant in turn, each round starting with the next")
    for batch in batches[: args.warmup]:
        for variant, (_, step) in built.items():
            start = time.perf_counter()
            step(batch)
            if variant == "now-compiled" and batch is batches[0]:
                print(f"now-compiled: the first step, compiling included, took {time.perf_counter() - start:.0f} s")
    seconds = {variant: [] for variant in variants}
    for i, batch in enumerate(batches[args.warmup :]):
        for variant in variants[i % len(variants):] + variants[: i % len(variants)]:
            seconds[variant].append(timed(lambda: built[variant][1](batch), "cpu"))
    if args.profile:
        print("where a step of now goes (torch.profiler, 2 steps, self CPU time):")
        profile_step(built["now"][1], batches[args.warmup : args.warmup + 2])
    timed_batches = batches[args.warmup :]
    tokens = sum(int(batch["attention_mask"].sum()) for batch in timed_batches)
    flops = sum(count_flops(batch) for batch in timed_batches)
    del built
    peaks = {} if args.no_memory else peak_memory(config, args.memory_steps, variants)

    throughput = {variant: tokens / sum(times) for variant, times in seconds.items()}

    def ratio(variant: str, other: str) -> str:
        return f"{throughput[variant] / throughput[other]:.2f}" if other in throughput else "-"

    print("| variant | median s/step | tokens/s | / before | / peft-bf16 | MFU |" + (" peak GB |" if peaks else ""))
    print("| --- | --- | --- | --- | --- | --- |" + (" --- |" if peaks else ""))
    for variant, times in seconds.items():
        mfu = flops / sum(times) / rate
        print(f"| {variant} | {statistics.median(times):.3f} | {throughput[variant]:.0f} | {ratio(variant, 'before')} | "
              f"{ratio(variant, 'peft-bf16')} | {mfu:.0%} |" + (f" {peaks[variant]:.2f} |" if peaks else ""))
    print(f"the model's own MLP product ({tokens_per_step} x {model_config.hidden_size} @ {model_config.hidden_size} "
          f"x {model_config.intermediate_size}, bf16) runs at {shape_rate / 1e9:.0f} GFLOP/s here, "
          f"{shape_rate / rate:.0%} of the {size} x {size} product's: the ceiling of MFU for this model's shapes")
    if set(VARIANTS) <= set(throughput):
        now, peft = throughput["now"], throughput["peft-bf16"]
        print(f"targets: tokens/s at least 1.2x peft's: {now / peft:.2f}x; at least 1.3x before: "
              f"{now / throughput['before']:.2f}x; MFU at least 50%: {flops / sum(seconds['now']) / rate:.0%}"
              + (f"; peak memory at most peft's: {peaks['now']:.2f} GB against {peaks['peft-bf16']:.2f} GB"
                 if peaks else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
