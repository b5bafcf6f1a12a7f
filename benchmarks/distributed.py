"""Seconds per training step and bytes exchanged per step: one process, DDP and FSDP2 over 2.

Every setup takes the same optimizer step: 2 micro-batches of ``--batch`` x ``--seq`` tokens,
accumulated in one process, or one per process over two (``training/loop.py``'s
``accumulate_gradients``, clipping and AdamW). The model is a random one of the embedded
SmolLM2's shape (speed does not depend on the weights' values) with LoRA on q_proj and v_proj.

- MB exchanged: the size of the tensors the processes combine in a step. DDP's is what it hands
  to all-reduce, counted by a communication hook (``GradientTraffic``), for LoRA and, for
  comparison, for full fine-tuning of the same model (every weight trainable; its step is not
  timed). FSDP2's is every parameter it gathers whole and every gradient it reduces,
  counted by wrapping the two ``torch.distributed`` functions it calls, ``all_gather_single``
  and ``reduce_scatter_single`` (if a later torch calls others, the count is 0: shown as "-").

    python -m benchmarks.distributed                     # the embedded shape, 2 x 256 tokens a micro-batch
    python -m benchmarks.distributed --model tiny-llama --steps 2

Two processes on a 2-core machine share the same two cores that one process with two threads
uses, so they cannot be faster here: what this machine shows is the cost of exchanging, not
the gain of more hardware. With N GPUs, ``torchrun --nproc-per-node N`` gives each process its
own device; the launch commands are in tutorials/H_distributed.md.
"""

import argparse
import contextlib
import json
import statistics
import sys
import time

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from lora import inject_lora
from models.loader import load_config
from models.precision import choose_precision
from training import distributed
from training.distributed import World
from training.loop import accumulate_gradients

SETUPS = ("1 process", "ddp", "fsdp2")


def random_model(name: str, seed: int = 0):
    """A model of ``name``'s shape (``models.loader.load_config``) with seeded random weights, float32."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(load_config(name), dtype=torch.float32)


def micro_batches(vocab_size: int, n: int, batch: int, seq: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    ids = [torch.randint(0, vocab_size, (batch, seq), generator=generator) for _ in range(n)]
    return [{"input_ids": each, "attention_mask": torch.ones_like(each), "labels": each} for each in ids]


def gradient_bytes(model, world: World, full: bool) -> int:
    """Bytes one rank sends to DDP's all-reduce in one backward: LoRA's gradients, or (``full``) every weight's."""
    model.requires_grad_(full)
    if not full:
        inject_lora(model)
    ddp = distributed.wrap_model(model.to(world.device).train(), "ddp", world)
    traffic = GradientTraffic().attach(ddp)
    off = torch.amp.GradScaler("cpu", enabled=False)
    batch = {key: value.to(world.device) for key, value in
             micro_batches(model.config.vocab_size, 1, 1, 16, seed=world.rank)[0].items()}
    accumulate_gradients(ddp, [batch], choose_precision("fp32", world.device), off, world=world)
    return traffic.bytes


class GradientTraffic:
    """A DDP communication hook that counts the bytes this rank hands to all-reduce, then all-reduces.

    ``GradientTraffic().attach(ddp_model)``; ``.bytes`` grows by each gradient bucket's size. It
    proves what the frozen base costs DDP: nothing, as it has no gradients.
    """

    def __init__(self):
        self.bytes = 0

    def attach(self, model: DistributedDataParallel) -> "GradientTraffic":
        model.register_comm_hook(None, self.hook)
        return self

    def hook(self, process_group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        self.bytes += bucket.buffer().numel() * bucket.buffer().element_size()
        return default_hooks.allreduce_hook(process_group, bucket)


@contextlib.contextmanager
def counting_fsdp2_collectives(counter: dict):
    """Add to ``counter["bytes"]`` the size of every tensor FSDP2 gathers whole or reduces whole."""
    originals = {name: getattr(dist, name) for name in ("all_gather_single", "reduce_scatter_single")}

    def counted(name):
        def collective(output, input, *args, **kwargs):
            whole = output if name == "all_gather_single" else input  # the gathered parameter, the full gradient
            counter["bytes"] += whole.numel() * whole.element_size()
            return originals[name](output, input, *args, **kwargs)
        return collective

    for name in originals:
        setattr(dist, name, counted(name))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)


def time_steps(args, world: World, setup: str) -> dict:
    """Median seconds per optimizer step of ``setup`` after warm-up, with what it exchanges."""
    model = random_model(args.model).to(world.device)
    inject_lora(model)
    vocab_size = model.config.vocab_size
    model = distributed.wrap_model(model.train(), "none" if setup == "1 process" else setup, world)
    traffic = GradientTraffic().attach(model) if setup == "ddp" else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    precision = choose_precision(args.precision, world.device)
    off = torch.amp.GradScaler("cpu", enabled=False)
    per_rank = max(2 // world.size, 1)  # more than 2 processes (GPUs): one micro-batch each
    seconds, fsdp2 = [], {"bytes": 0}
    with counting_fsdp2_collectives(fsdp2) if setup == "fsdp2" else contextlib.nullcontext():
        for step in range(args.warmup + args.steps):
            batches = micro_batches(vocab_size, per_rank, args.batch, args.seq, seed=step * world.size + world.rank)
            batches = [{key: value.to(world.device) for key, value in batch.items()} for batch in batches]
            start = time.perf_counter()
            accumulate_gradients(model, batches, precision, off, world=world)
            distributed.clip_grad_norm(trainable, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            distributed.barrier()
            seconds.append(time.perf_counter() - start)
    exchanged = traffic.bytes if traffic else fsdp2["bytes"]
    return {"setup": setup, "seconds": statistics.median(seconds[args.warmup:]), "tokens": 2 * args.batch * args.seq,
            "bytes": exchanged / (args.warmup + args.steps)}


def worker(args) -> None:
    """Under torchrun: time DDP and FSDP2, measure full fine-tuning's bytes; rank 0 prints JSON lines."""
    world = distributed.start()
    results = [time_steps(args, world, "ddp"), time_steps(args, world, "fsdp2"),
               {"setup": "full fine-tuning (ddp)", "bytes": gradient_bytes(random_model(args.model), world, True)}]
    if world.is_main:
        for result in results:
            print(json.dumps(result))
    distributed.stop()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="whose shape (%(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="sequences per micro-batch (%(default)s)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (%(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="bf16", help="(%(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (%(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps; the median is reported (%(default)s)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    options = ["--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq), "--precision",
               args.precision, "--warmup", str(args.warmup), "--steps", str(args.steps)]
    alone = time_steps(args, World(), "1 process")
    launched = distributed.torchrun(["-m", "benchmarks.distributed", "--worker", *options], processes=2)
    if launched.returncode != 0:
        print(f"the 2-process run failed:\n{launched.stderr[-5000:]}", file=sys.stderr)
        return 1
    results = [alone] + [json.loads(line) for line in launched.stdout.splitlines() if line.startswith("{")]
    print(f"{args.model}'s shape, random weights, {args.precision}; a step = 2 micro-batches of {args.batch} x "
          f"{args.seq} tokens; {torch.get_num_threads()} threads alone, 1 each of 2 processes (gloo); "
          f"median of {args.steps} steps after {args.warmup}")
    print("| setup | processes | s/step | tokens/s | MB exchanged per step |")
    print("| --- | --- | --- | --- | --- |")
    for result in results:
        processes = 1 if result["setup"] == "1 process" else 2
        timing = (f"{result['seconds']:.3f} | {result['tokens'] / result['seconds']:.0f}" if "seconds" in result
                  else "- | -")
        exchanged = f"{result['bytes'] / 1e6:.2f}" if result["bytes"] or processes == 1 else "-"
        print(f"| {result['setup']} | {processes} | {timing} | {exchanged} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
