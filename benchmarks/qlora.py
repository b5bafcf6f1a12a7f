"""Memory and seconds per LoRA training step, the frozen base held in float32, bf16, NF4 or NF4 double-quantized.

Every variant trains the same LoRA (float32 A and B, bf16 autocast where the device has it, as
the training loop does) on a base stored four ways, the full-size ones with LoRA on its fused path
(``use_fused_lora``, as benchmarks/README.md measured them), the 4-bit ones on the plain path, the
only one a 4-bit base takes:

- fp32: the weights as loaded;
- bf16: every weight cast to bf16 (half the bytes);
- nf4: every Linear but the vocabulary head in 4-bit NF4 (``lora/nf4.py``, QLoRA);
- nf4-dq: the same with the absmax constants quantized too.

Weight memory is counted from the model's tensors (shared ones once). Memory in use is each
variant's alone, in a fresh process: resident after loading, converting and adding LoRA (Python
and the libraries included), and the peak during 3 training steps, with the peak of loading
reset first (Linux /proc; on a GPU, the CUDA allocator's counts).
Step times are interleaved in one process, as in ``benchmarks.lora_step``.

    python -m benchmarks.qlora                    # the embedded model, batch 2 x 512 (the loop's), r 8 on q_proj,v_proj
"""

import argparse
import copy
import gc
import json
import statistics
import sys
from pathlib import Path

import torch

from benchmarks.lora_step import (
    RANDOM_SHAPES,
    STATUS,
    in_fresh_process,
    load_benchmark_model,
    paired_ratio,
    resident_bytes,
    timed,
    train_step,
)
from lora import inject_lora, lora_layers, parse_targets, quantize_model, use_fused_lora
from models.loader import EMBEDDED
from models.precision import cpu_supports_bf16

BASES = ("fp32", "bf16", "nf4", "nf4-dq")


def build(base_model, base: str, r: int, targets: list[str], device: str, copy_base: bool = True):
    """``base_model`` (or a copy) with its base stored as ``base``, LoRA on ``targets``, and AdamW over A and B."""
    model = (copy.deepcopy(base_model) if copy_base else base_model).to(device)
    if base == "bf16":
        model.to(torch.bfloat16)
    elif base.startswith("nf4"):
        quantize_model(model, double_quant=base == "nf4-dq")
    torch.manual_seed(0)
    inject_lora(model, targets, r=r, alpha=2 * r)
    use_fused_lora(model, not base.startswith("nf4"))
    for _, layer in lora_layers(model):  # float32 adapters on every base, as the loop keeps them
        layer.lora_A.float()
        layer.lora_B.float()
        torch.nn.init.normal_(layer.lora_B.weight, std=0.01)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return model, optimizer


def weight_bytes(model) -> int:
    """Bytes of the model's parameters and buffers, each storage counted once (tied weights share one)."""
    storages = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(storages.values())


def use_autocast(device: str) -> bool:
    return device == "cuda" or cpu_supports_bf16()


def child_memory(args, device: str) -> None:
    """Print as JSON one variant's weight bytes and its peak memory during 3 training steps (for ``peak_memory``)."""
    model, optimizer = build(load_benchmark_model(args.model), args.child_memory, args.r, args.targets, device,
                             copy_base=False)
    gc.collect()
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    elif STATUS.exists():
        Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set (VmHWM) to now
    before = resident_bytes("VmRSS") if device == "cpu" else torch.cuda.memory_allocated()
    ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), device=device)
    for _ in range(3):
        train_step(model, optimizer, "lora", ids, use_autocast(device))
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resident_bytes("VmHWM")
    print(json.dumps({"base": args.child_memory, "weight_bytes": weight_bytes(model), "before_bytes": before,
                      "peak_bytes": peak}))



def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.qlora", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=EMBEDDED, help=f"a name load_model knows or {', '.join(RANDOM_SHAPES)} "
                        "(%(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="(%(default)s)")
    parser.add_argument("--seq", type=int, default=512, help="tokens per sequence (%(default)s)")
    parser.add_argument("--r", type=int, default=8, help="rank, with alpha = 2 r (%(default)s)")
    parser.add_argument("--targets", default="q_proj,v_proj", help="(%(default)s)")
    parser.add_argument("--bases", default=",".join(BASES), help="(%(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (%(default)s)")
    parser.add_argument("--steps", type=int, default=8, help="timed rounds; the median is reported (%(default)s)")
    parser.add_argument("--child-memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.targets, args.bases = parse_targets(args.targets), args.bases.split(",")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child_memory:
        child_memory(args, device)
        return 0

    autocast = use_autocast(device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"{torch.get_num_threads()} CPU threads"
    print(f"{args.model} on {device} ({name}), {'bf16 autocast' if autocast else 'fp32'}; batch {args.batch} x "
          f"{args.seq} tokens; LoRA r={args.r} on {','.join(args.targets)}; median of {args.steps} interleaved steps "
          f"after {args.warmup} warm-up rounds; ratios are medians of the ratios within a round")
    memory = {}
    for base in args.bases:  # each alone in a fresh process, before this one holds four models
        command = [sys.executable, "-m", "benchmarks.qlora", "--child-memory", base, "--model", args.model,
                   "--batch", str(args.batch), "--seq", str(args.seq), "--r", str(args.r),
                   "--targets", ",".join(args.targets)]
        memory[base] = in_fresh_process(command)

    loaded = load_benchmark_model(args.model)
    models = {base: build(loaded, base, args.r, args.targets, device) for base in args.bases}
    del loaded
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, models[args.bases[0]][0].config.vocab_size, (args.batch, args.seq), generator=generator)
    ids = ids.to(device)
    for _ in range(args.warmup):
        for model, optimizer in models.values():
            train_step(model, optimizer, "lora", ids, autocast)
    seconds = {base: [] for base in models}
    for step in range(args.steps):
        for base in args.bases[step % len(args.bases):] + args.bases[:step % len(args.bases)]:
            model, optimizer = models[base]
            seconds[base].append(timed(lambda: train_step(model, optimizer, "lora", ids, autocast), device))

    reference = args.bases[0]
    print(f"| base | weights MB | resident before training MB | peak training MB | median s/step | / {reference} |")
    print("| --- | --- | --- | --- | --- | --- |")
    for base in args.bases:
        mb = {key: memory[base][key] / 1e6 for key in ("weight_bytes", "before_bytes", "peak_bytes")}
        print(f"| {base} | {mb['weight_bytes']:.1f} | {mb['before_bytes']:.0f} | {mb['peak_bytes']:.0f} | "
              f"{statistics.median(seconds[base]):.3f} | {paired_ratio(seconds, base, reference):.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
