"""Several distributed scenarios in one torchrun launch, for tests/test_distributed.py.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/distributed_worker.py OUT

Each training scenario is a run in ``OUT/<name>/`` (rank 0 writes it); the test trains the
single-process twin of each and compares. Checks that need the live process group write what
they saw to ``OUT/findings.json``, and the test asserts on it. Starting two Python processes
with torch and transformers costs seconds, so one launch covers many scenarios.
"""

import json
import sys
from pathlib import Path

import torch

from benchmarks.distributed import GradientTraffic
from lora import LoRALinear, NF4Linear, inject_lora, lora_layers, quantize_model
from models.loader import tiny_model
from models.precision import FP32
from training import distributed, loop
from training.config import parse_config
from training.distributed import World

# Small and quick: windows of 64 tokens of the tiny Llama, 3 steps, validated at 2 and 3, checkpointed at 2.
BASE = ["--model", "tiny-llama", "--max-length", "64", "--stride", "32", "--batch-size", "4", "--eval-batches", "2",
        "--precision", "fp32", "--max-steps", "3", "--eval-every", "2", "--checkpoint-every", "2"]
# name: the 2-process run's own settings. Its single-process twin (``single_process_twin``) takes
# twice the micro-batches per step: the same optimisation.
SCENARIOS = {
    "ddp": ["--strategy", "ddp"],
    "ddp-fused": ["--strategy", "ddp", "--lora-path", "fused"],
    "ddp-nf4": ["--strategy", "ddp", "--quantize", "nf4", "--double-quant", "true"],
    "ddp-accumulating-with-dropout": ["--strategy", "ddp", "--grad-accum", "2", "--dropout", "0.1"],
    "fsdp2": ["--strategy", "fsdp2"],
    "fsdp2-fused": ["--strategy", "fsdp2", "--lora-path", "fused"],
    "fsdp2-nf4": ["--strategy", "fsdp2", "--quantize", "nf4", "--double-quant", "true"],
    "fsdp2-accumulating-with-dropout": ["--strategy", "fsdp2", "--grad-accum", "2", "--dropout", "0.1"],
}
# Resumed: 2 steps, a checkpoint after each; the newest is then cut in half, and --resume to 4 falls
# back to the checkpoint of step 1, the one rank 0 chooses for every rank (FSDP2: the optimizer
# state is sharded, gathered and re-sharded).
RESUMED = ("fsdp2-resumed", ["--strategy", "fsdp2", "--checkpoint-every", "1", "--max-steps", "2"],
           ["--max-steps", "4"])


def single_process_twin(settings: list[str]) -> list[str]:
    """The settings without ``--strategy``, and with ``--grad-accum`` doubled: one process doing two processes' work.

    ``settings`` are flag-value pairs (a switch written ``--double-quant true``)."""
    assert len(settings) % 2 == 0, f"flags and values in pairs: {settings}"
    values = dict(zip(settings[::2], settings[1::2]))
    values.pop("--strategy", None)
    values["--grad-accum"] = str(2 * int(values.get("--grad-accum", "1")))
    return [item for pair in values.items() for item in pair]


def token_batches(model, n: int, seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=generator)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return batches


def gradient_bytes_per_step(world: World, quantize: bool) -> dict:
    """Bytes one rank hands to DDP's all-reduce in a step of 2 micro-batches, and what the model holds."""
    model = tiny_model("tiny-llama")
    if quantize:
        quantize_model(model)
    inject_lora(model)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    ddp = distributed.wrap_model(model.train(), "ddp", world)
    traffic = GradientTraffic().attach(ddp)
    off = torch.amp.GradScaler("cpu", enabled=False)
    loop.accumulate_gradients(ddp, token_batches(model, 2, seed=world.rank), FP32, off, world=world)
    return {"sent": traffic.bytes, "trainable": trainable, "frozen": frozen}


def fsdp2_bf16_storage(world: World) -> dict:
    """What a 4-bit layer and a LoRA layer hold inside the forward under FSDP2's bf16 policy."""
    model = tiny_model("tiny-llama")
    quantize_model(model, double_quant=True)
    inject_lora(model)
    whole = {name: layer.dequantize() for name, layer in model.named_modules() if isinstance(layer, NF4Linear)}
    distributed.wrap_model(model, "fsdp2", world, mixed_precision=True)
    seen = {"storage_dtypes": set(), "dequantized_as_before": [], "lora_dtypes": set()}

    def look_at_4bit(name):
        def hook(layer, args):
            seen["storage_dtypes"].update(str(tensor.dtype) for tensor in layer.storage())
            seen["dequantized_as_before"].append(torch.equal(layer.dequantize(), whole[name]))
        return hook

    for name, layer in model.named_modules():
        if isinstance(layer, NF4Linear):
            layer.register_forward_pre_hook(look_at_4bit(name))  # after FSDP2's own: the layer is gathered
        if isinstance(layer, LoRALinear):
            layer.register_forward_pre_hook(lambda layer, args: seen["lora_dtypes"].add(str(layer.lora_A.weight.dtype)))
    with torch.no_grad():
        model(input_ids=token_batches(model, 1, seed=0)[0]["input_ids"])
    return {"storage_dtypes": sorted(seen["storage_dtypes"]), "lora_dtypes": sorted(seen["lora_dtypes"]),
            "dequantized_as_before": all(seen["dequantized_as_before"]), "layers": len(seen["dequantized_as_before"])}


def error_when_an_adapter_is_disabled(world: World, out: Path) -> str:
    """The error a DDP run gives when one LoRA layer takes no part in the forward."""
    inject = loop.inject_lora

    def inject_and_disable_one(model, *args, **kwargs):
        targets = inject(model, *args, **kwargs)
        next(layer for _, layer in lora_layers(model)).disabled = True
        return targets

    loop.inject_lora = inject_and_disable_one
    try:
        config, _ = parse_config([*BASE, "--strategy", "ddp", "--out", str(out), "--name", "disabled"])
        loop.train(config, world=world)
    except loop.BadInput as error:
        return str(error)
    finally:
        loop.inject_lora = inject
    return "no error"


def main(out: Path) -> None:
    world = distributed.start()
    for name, settings in SCENARIOS.items():
        config, _ = parse_config([*BASE, *settings, "--out", str(out), "--name", name])
        loop.train(config, world=world)
    name, first, then = RESUMED
    config, _ = parse_config([*BASE, *first, "--out", str(out), "--name", name])
    loop.train(config, world=world)
    if world.is_main:
        newest = out / name / "checkpoint.safetensors"
        newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a disk fault mid-file
    distributed.barrier()
    config, resume = parse_config(["--resume", str(out / name), *then])
    loop.train(config, resume, world=world)

    findings = {
        "world_size": world.size,
        "ddp_bytes": gradient_bytes_per_step(world, quantize=False),
        "ddp_bytes_nf4": gradient_bytes_per_step(world, quantize=True),
        "fsdp2_bf16": fsdp2_bf16_storage(world),
        "disabled_adapter_error": error_when_an_adapter_is_disabled(world, out),
    }
    if world.is_main:
        (out / "findings.json").write_text(json.dumps(findings, indent=2))
    distributed.stop()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
