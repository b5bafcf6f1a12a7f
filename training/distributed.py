"""Many processes, one run: the training loop on torch.distributed, launched by torchrun.

    torchrun --standalone --nproc-per-node 2 -m training.loop                   # DDP, 2 processes
    torchrun --standalone --nproc-per-node 2 -m training.loop --strategy fsdp2  # the base sharded

torchrun starts the same program N times and tells each copy, a *rank*, its place in environment
variables (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``). Data parallelism in one picture: every rank
takes its own micro-batches of each optimizer step, and before the step the ranks combine their
gradients, so every rank takes the same AdamW step and the copies never drift apart::

    rank 0:  micro-batch 0 ─ forward ─ backward ─ grads ─┐
                                                          ├─ all-reduce: mean ─ the same step everywhere
    rank 1:  micro-batch 1 ─ forward ─ backward ─ grads ─┘

LoRA is the best case for it: only A and B have gradients, so the ranks exchange 0.34% of what
full fine-tuning would (about 1.8 MB a step for the embedded model instead of 540 MB).

- **DDP** (``DistributedDataParallel``) keeps a whole model on every rank and all-reduces the
  gradients, bucket by bucket, while the backward still runs. The frozen base has no gradients,
  so it is never sent.
- **FSDP2** (``fully_shard``) keeps 1/N of every parameter on each rank, frozen base included, and
  all-gathers a decoder layer's parameters just before it runs (forward and backward), then frees
  them. It pays only when the base does not fit on one device: it moves the whole base twice a
  step where DDP moves only the LoRA gradients.

What stays the same as one process is the optimisation: rank r takes the global micro-batches
``m * world_size + r``, so N ranks with ``--grad-accum g`` take the same steps as one process
with ``--grad-accum g * N`` (``training/loop.py``).
"""

import contextlib
import datetime
import gc
import os
import signal
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from lora.adapter import KEY_PREFIX
from lora.nf4 import NF4Linear

STRATEGIES = ("auto", "ddp", "fsdp2")
# How long a rank waits in a collective for the others before it gives up: longer than any one
# rank works alone (loading the model, writing a checkpoint), short enough that a hang ends.
TIMEOUT = datetime.timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank ``rank`` of ``size`` processes, computing on ``device``."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints and writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def start() -> World:
    """Join torchrun's process group if torchrun started this process with others; else one process.

    The backend follows the device: gloo on CPU, nccl on CUDA with each rank on ``cuda:LOCAL_RANK``.
    """
    size, local_rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank if size > 1 else 0)
        torch.cuda.set_device(device)
    if size == 1:
        return World(device=device)
    if not dist.is_initialized():
        # torchrun's store outlives a failed attempt; keys of our own attempt's, so a restarted
        # group does not read the old group's addresses and try to connect to dead processes.
        store, rank, size = next(dist.rendezvous("env://", timeout=TIMEOUT))
        store = dist.PrefixStore(f"attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/", store)
        backend, device_id = ("nccl", device) if device.type == "cuda" else ("gloo", None)
        dist.init_process_group(backend, store=store, rank=rank, world_size=size, timeout=TIMEOUT,
                                device_id=device_id)
    return World(dist.get_rank(), dist.get_world_size(), device)


def stop() -> None:
    """Leave the process group in an order that cannot deadlock.

    The wrapped model and optimizer must be gone first (the caller drops them; ``gc.collect``
    frees DDP's reference cycles), then every rank meets at a barrier, then the group is
    destroyed. Destroying it while another rank still has work in flight hangs gloo's
    destructor about half the time (pytorch/pytorch#56297, #75097).
    """
    if dist.is_initialized():
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()


def restarted() -> bool:
    """Whether torchrun restarted this worker group after a failure (``--max-restarts``)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0


def run_id() -> str | None:
    """torchrun's rendezvous id, the same for every rank and every restart of one job; None without torchrun."""
    return os.environ.get("TORCHELASTIC_RUN_ID")


def _collective_device() -> torch.device:
    """Where a collective's tensors must be: nccl moves CUDA tensors only."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_over_ranks(*values: float) -> list[float]:
    """Each of ``values`` summed over every rank (in float64, so token counts stay exact); as given in one process.

    Every rank gets the same sums, so decisions made on them (stop on a non-finite loss, stop
    early) are the same everywhere: no rank is left waiting in a collective the others skipped.
    """
    if not dist.is_initialized():
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=_collective_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def broadcast_text(text: str) -> str:
    """Rank 0's ``text`` on every rank (its UTF-8 bytes through a tensor: nothing is pickled)."""
    if not dist.is_initialized():
        return text
    device = _collective_device()
    data = torch.tensor(list(text.encode()) if dist.get_rank() == 0 else [], dtype=torch.uint8, device=device)
    length = torch.tensor([data.numel()], device=device)
    dist.broadcast(length, 0)
    if dist.get_rank() != 0:
        data = torch.empty(int(length), dtype=torch.uint8, device=device)
    dist.broadcast(data, 0)
    return bytes(data.tolist()).decode()


def gather_tensors(tensor: torch.Tensor) -> list[torch.Tensor]:
    """Every rank's ``tensor`` (same shape and dtype on all), in rank order; ``[tensor]`` in one process."""
    if not dist.is_initialized():
        return [tensor]
    device = _collective_device()
    gathered = [torch.empty_like(tensor, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, tensor.to(device))
    return [each.cpu() for each in gathered]


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer's stack of decoder layers (``model.model.layers`` in Llama and Qwen2)."""
    layers = getattr(model.get_decoder(), "layers", None) if hasattr(model, "get_decoder") else None
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"--strategy fsdp2 shards each decoder layer; {type(model).__name__} has no "
                         "get_decoder().layers; use --strategy ddp")
    return layers


def wrap_model(model: nn.Module, strategy: str, world: World, mixed_precision: bool = False) -> nn.Module:
    """``model`` spread over the ranks: DDP (a wrapper) or FSDP2 (sharded in place); itself in one process.

    DDP: ``find_unused_parameters=False`` (every LoRA parameter gets a gradient every step, so
    DDP need not search the graph for the ones that do not) and ``broadcast_buffers=False`` (the
    buffers never change; re-sending them every forward would cost time for nothing).

    FSDP2: each decoder layer is a unit, then the root (embeddings, final norm, head); A and B
    shard inside their layer's unit, never as units of their own, so a layer's forward sees them
    whole (the fused path reads their ``.weight`` directly). The device mesh is given explicitly:
    without it, gloo on a machine with a GPU moves the model to CUDA (pytorch/pytorch#132471).
    With ``mixed_precision``, parameters are gathered in bf16 (half the bytes) and gradients
    reduced in fp32; a 4-bit base layer is then a unit of its own with no policy, because the
    policy casts every floating-point parameter and the layer's float32 block constants must
    arrive as stored.
    """
    if not world.distributed:
        return model
    if strategy == "ddp":
        device_ids = [world.device.index] if world.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids, find_unused_parameters=False,
                                       broadcast_buffers=False)
    mesh = init_device_mesh(world.device.type, (world.size,))
    policy = MixedPrecisionPolicy()
    if mixed_precision:
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for module in model.modules():
            if isinstance(module, NF4Linear):
                fully_shard(module, mesh=mesh)
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP's wrapper (FSDP2 shards in place: its model is the model)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def gradient_sync(model: nn.Module, enabled: bool):
    """Exchange gradients in this backward (``enabled``) or only accumulate them locally.

    While accumulating micro-batches only the last backward needs to exchange: the sum of the
    local gradients is what gets averaged. DDP: ``no_sync()``; FSDP2: ``set_requires_gradient_sync``.
    """
    if isinstance(model, DistributedDataParallel) and not enabled:
        with model.no_sync():
            yield
        return
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)
    yield


def without_gradient(model: nn.Module) -> list[str]:
    """Trainable parameters that got no gradient in this step, under DDP (where that is an error); else [].

    DDP waits for every parameter's gradient before it all-reduces the bucket holding it; one
    that never comes (an adapter that was disabled during the forward) leaves the step
    unfinished, and DDP fails only at the next forward, with "Expected to have finished
    reduction in the prior iteration" (huggingface/peft#951). Asking here names the parameter.
    """
    if not isinstance(model, DistributedDataParallel):
        return []
    return [name for name, parameter in model.module.named_parameters()
            if parameter.requires_grad and parameter.grad is None]


def clip_grad_norm(parameters: list[nn.Parameter], max_norm: float) -> float:
    """Scale the gradients so that their global norm is at most ``max_norm``; return the norm before.

    Every rank calls it. Under DDP the gradients are already the same everywhere; under FSDP2
    each rank holds shards, the norm is a DTensor computed over all of them, and
    ``full_tensor()`` makes it a number every rank agrees on.
    """
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (A and B), whole, on the CPU, by parameter name: on rank 0; empty elsewhere.

    Under FSDP2 each A and B is gathered from its shards, so every rank must call this;
    ``ignore_frozen_params`` makes sure no weight of the frozen base is gathered. DDP's
    ``module.`` prefix is not in the names. (``cpu_offload`` is what leaves the other ranks empty.)
    """
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trainable = {name for name, parameter in unwrap(model).named_parameters() if parameter.requires_grad}
    # Buffers are not parameters, frozen or not: keep the trainable parameters alone.
    return {name: tensor for name, tensor in get_model_state_dict(model, options=options).items() if name in trainable}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``trainable_state`` under peft's adapter keys (``lora.save_adapter``'s ``tensors``); a collective."""
    return {KEY_PREFIX + name: tensor for name, tensor in trainable_state(model).items()}


def torchrun(arguments: list[str], processes: int = 2, timeout: float = 600,
             max_restarts: int = 0) -> subprocess.CompletedProcess:
    """Run ``torchrun --standalone --nproc-per-node processes <arguments>`` on this machine and wait for it.

    ``arguments``: what follows torchrun's own options (``["-m", "training.loop", ...]``, or a
    script). The launcher and its workers get a process group of their own, killed whole if they
    outlive ``timeout`` seconds: killing only the launcher could leave a worker waiting in a
    collective for ever. Returns the finished process, its output captured as text.

    Raises:
        TimeoutError: the run outlived ``timeout``; its process group was killed.
    """
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               f"--max-restarts={max_restarts}", *arguments]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        raise TimeoutError(f"torchrun {' '.join(arguments)} ran past {timeout} s; its process group was killed. "
                           f"Its last output:\n{err[-3000:]}") from None
    return subprocess.CompletedProcess(command, process.returncode, out, err)
