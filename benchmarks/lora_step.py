"""Seconds per LoRA training step: the frozen floor, peft, and this library's plain and fused paths.

One training step is forward, backward and AdamW on a batch of random tokens. The variants
run interleaved in one process after a warm-up, so a slow minute on a shared machine slows
them all alike:

- floor: the frozen model with gradients flowing to its input but to no weight: the least
  work any LoRA on every layer can do (the backward must still pass through every layer);
- peft: Hugging Face peft's LoRA on the same modules;
- plain: ``LoRALinear`` on its plain path, the default (peft's operations, op for op);
- fused: ``LoRALinear`` on its opt-in fused path (``lora/fused.py``, ``use_fused_lora(model, True)``);
- dora, peft-dora (asked for with ``--variants``): DoRA here (``lora/dora.py``) and in peft, what
  its magnitude and the row norms of W + sBA cost a step against plain LoRA.

    python -m benchmarks.lora_step                       # the embedded model, batch 4 x 256, r 8, float32
    python -m benchmarks.lora_step --precision bf16 --r 64 --dropout 0.05
    python -m benchmarks.lora_step --memory              # peak memory, each variant in its own process
    python -m benchmarks.lora_step --variants floor,plain,dora,peft-dora --memory    # DoRA's cost

The device is chosen automatically (CUDA when present); bf16 means autocast, as in the loop.
"""

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from lora import disable_lora, inject_lora, parse_targets, use_fused_lora
from models.loader import EMBEDDED, load_model

VARIANTS = ("floor", "peft", "plain", "fused")  # the default set
DORA_VARIANTS = ("dora", "peft-dora")

# Random models with a real model's shape: speed does not depend on the weights' values, and
# these need no download. Qwen2.5-0.5B's shape, from its config.json.
RANDOM_SHAPES = {
    "random-qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                                num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}


def load_benchmark_model(name: str):
    """A model ``load_model`` knows, or one of ``RANDOM_SHAPES`` built with random weights (float32)."""
    if name not in RANDOM_SHAPES:
        return load_model(name)[0]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(Qwen2Config(**RANDOM_SHAPES[name]), dtype=torch.float32)


def build(base, variant: str, r: int, dropout: float, targets: list[str], device: str, copy_base: bool = True):
    """``base`` (or a copy) set up for ``variant``, training, and an optimizer over what trains (None: the floor)."""
    model = (copy.deepcopy(base) if copy_base else base).to(device).train()
    model.requires_grad_(False)  # the floor trains nothing; the LoRA variants unfreeze A and B only
    torch.manual_seed(0)
    if variant in ("peft", "peft-dora"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout, target_modules=targets,
                                                 use_dora=variant == "peft-dora"))
    elif variant in ("plain", "fused", "dora"):
        inject_lora(model, targets, r=r, alpha=2 * r, dropout=dropout, use_dora=variant == "dora")
        use_fused_lora(model, variant == "fused")
    if variant != "floor":
        for name, parameter in model.named_parameters():  # B = 0 would make some products trivially cheap
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.01)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4) if trainable else None
    return model, optimizer


STATUS = Path("/proc/self/status")


def resident_bytes(field: str) -> float:
    """``VmRSS`` (resident now) or ``VmHWM`` (its peak) of this process from /proc; NaN where there is no /proc."""
    if not STATUS.exists():
        return float("nan")
    return int(next(line for line in STATUS.read_text().splitlines() if line.startswith(field)).split()[1]) * 1024


def peak_memory_gb(device: str) -> float:
    """This process's peak memory so far, GB: max allocated on CUDA, else the peak resident set."""
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 1e9
    if STATUS.exists():  # Linux: VmHWM, as getrusage's maxrss survives exec (the parent's)
        return resident_bytes("VmHWM") / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e9  # macOS: maxrss in bytes


def in_fresh_process(command: list[str]) -> dict:
    """Run ``command`` (a ``--child-memory`` run of a benchmark) in a fresh process; the JSON its last line prints."""
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def timed(function, device: str) -> float:
    """Wall-clock seconds of ``function()``, waiting for the GPU's queued work on both sides."""
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    function()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def train_step(model, optimizer, variant: str, ids: torch.Tensor, bf16: bool) -> None:
    """One forward, backward and AdamW step."""
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=bf16):
        if variant == "floor":
            embeddings = model.get_input_embeddings()(ids).detach().requires_grad_()
            with disable_lora(model):
                loss = model(inputs_embeds=embeddings, labels=ids).loss
        else:
            loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def time_variants(args, device: str) -> dict[str, list[float]]:
    """Seconds per step of every variant, interleaved: warm-up steps first, then ``args.steps`` rounds."""
    base = load_benchmark_model(args.model)
    models = {variant: build(base, variant, args.r, args.dropout, args.targets, device) for variant in args.variants}
    del base
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, models[args.variants[0]][0].config.vocab_size, (args.batch, args.seq), generator=generator)
    ids = ids.to(device)
    bf16 = args.precision == "bf16"
    for _ in range(args.warmup):
        for variant, (model, optimizer) in models.items():
            train_step(model, optimizer, variant, ids, bf16)
    seconds = {variant: [] for variant in models}
    for step in range(args.steps):
        order = args.variants[step % len(args.variants):] + args.variants[:step % len(args.variants)]
        for variant in order:  # each round starts one variant later, so none always runs first
            model, optimizer = models[variant]
            seconds[variant].append(timed(lambda: train_step(model, optimizer, variant, ids, bf16), device))
    return seconds


def paired_ratio(seconds: dict[str, list[float]], variant: str, reference: str) -> float:
    """The median over rounds of ``variant``'s time over ``reference``'s in the same round.

    A slow minute on a shared machine slows both steps of a round alike, so the ratio within a
    round varies much less than either time does.
    """
    return statistics.median(a / b for a, b in zip(seconds[variant], seconds[reference]))


def peak_memory(args, device: str) -> dict[str, float]:
    """Peak memory in GB of each variant alone in a fresh process (max RSS on CPU, max allocated on CUDA)."""
    peaks = {}
    for variant in args.variants:
        command = [sys.executable, "-m", "benchmarks.lora_step", "--child-memory", variant, "--model", args.model,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r),
                   "--dropout", str(args.dropout), "--precision", args.precision, "--targets", ",".join(args.targets)]
        peaks[variant] = in_fresh_process(command)["peak_gb"]
    return peaks


def child_memory(args, device: str) -> None:
    """Run 3 steps of one variant and print its peak memory as JSON (for ``peak_memory``)."""
    base = load_benchmark_model(args.model)
    model, optimizer = build(base, args.child_memory, args.r, args.dropout, args.targets, device, copy_base=False)
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    for _ in range(3):
        train_step(model, optimizer, args.child_memory, ids, args.precision == "bf16")
    print(json.dumps({"variant": args.child_memory, "peak_gb": peak_memory_gb(device)}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED, help=f"a name load_model knows or {', '.join(RANDOM_SHAPES)} "
                        "(%(default)s)")
    parser.add_argument("--batch", type=int, default=4, help="(%(default)s)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (%(default)s)")
    parser.add_argument("--r", type=int, default=8, help="rank, with alpha = 2 r (%(default)s)")
    parser.add_argument("--dropout", type=float, default=0.0, help="(%(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32", help="bf16: autocast (%(default)s)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="(%(default)s)")
    parser.add_argument("--variants", default=",".join(VARIANTS), help="(%(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (%(default)s)")
    parser.add_argument("--steps", type=int, default=16, help="timed rounds; the median is reported (%(default)s)")
    parser.add_argument("--memory", action="store_true", help="also measure peak memory, a process per variant")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.targets, args.variants = parse_targets(args.targets), args.variants.split(",")
    unknown = [variant for variant in args.variants if variant not in VARIANTS + DORA_VARIANTS]
    if unknown:
        parser.error(f"--variants: unknown {unknown[0]!r}; choose from {', '.join(VARIANTS + DORA_VARIANTS)}")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child_memory:
        child_memory(args, device)
        return 0

    name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.model} on {device} ({name}), {args.precision}; batch {args.batch} x {args.seq} tokens; "
          f"LoRA r={args.r} alpha={2 * args.r} dropout={args.dropout} on {','.join(args.targets)}; "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up rounds; "
          "ratios are medians of the ratios within a round")
    seconds = time_variants(args, device)
    peaks = peak_memory(args, device) if args.memory else {}
    median = {variant: statistics.median(times) for variant, times in seconds.items()}
    tokens = args.batch * args.seq
    header = "| variant | median s/step | min | max | tokens/s | / floor | / peft |" + (" peak GB |" if peaks else "")
    print(header)
    print("|" + " --- |" * header.count(" |"))
    for variant, times in seconds.items():
        row = (f"| {variant} | {median[variant]:.3f} | {min(times):.3f} | {max(times):.3f} | "
               f"{tokens / median[variant]:.0f} | "
               + (f"{paired_ratio(seconds, variant, 'floor'):.3f} | " if "floor" in median else "- | ")
               + (f"{paired_ratio(seconds, variant, 'peft'):.3f} |" if "peft" in median else "- |"))
        print(row + (f" {peaks[variant]:.2f} |" if peaks else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
