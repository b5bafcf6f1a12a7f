"""Resumable checkpoints: everything a run needs to continue exactly, in one safetensors file.

A checkpoint holds the LoRA weights, AdamW's moment estimates, every rank's random-number state,
and the loop's ``RunState`` (the step, the best validation loss, the number of processes, ...).
Tensors go in the safetensors body; the rest (the run state, optimizer hyperparameters,
Python's random state) goes in its JSON header as strings.
Loading therefore never unpickles anything, unlike ``torch.load`` of a pickled state dict.

Weights and optimizer state are read and written through ``torch.distributed.checkpoint``'s
state-dict functions, keyed by parameter name: the same file comes from one process, DDP or
FSDP2 (whose shards are gathered whole; a collective, so every rank calls ``save_checkpoint``),
and loads into any of them. Rank 0 writes it, to a temporary name renamed into place, so a run
killed at any moment leaves the previous checkpoint whole.

The checkpoint before the newest is kept beside it, so that a disk fault or a damaged file
still leaves a step to resume from::

    runs/NAME/checkpoint.safetensors            the newest
    runs/NAME/checkpoint.previous.safetensors   the one before it

A new checkpoint is written whole under a temporary name first; only then does the newest
become the previous (a rename) and the new one the newest (a rename). ``choose_checkpoint``
picks the file a resumed run loads: the newest, or the previous when the newest is unreadable.
"""

import json
import math
import random
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from lora import adapter_state_dict
from lora.adapter import KEY_PREFIX
from lora.atomic import write_atomically
from training.distributed import World, barrier, gather_tensors, trainable_state, unwrap

CHECKPOINT_NAME = "checkpoint.safetensors"  # in the run folder; the previous one is previous_checkpoint(...)
UNREADABLE_SUFFIX = ".unreadable"  # an unreadable newest is renamed <name>.unreadable when a run resumes without it
OPTIMIZER_PREFIX = "optimizer."
RNG_PREFIX = "rng."  # rng.torch.<rank>, rng.cuda.<rank>
WHOLE = StateDictOptions(full_state_dict=True, cpu_offload=True)


@dataclass
class RunState:
    """What the training loop carries from step to step, saved and restored whole by a checkpoint."""

    step: int = 0  # optimizer steps taken
    best: float = math.inf  # the lowest validation loss so far
    evals_since_best: int = 0  # validations since it, for --early-stop
    history: dict[str, float] = field(default_factory=dict)  # validation loss by step (JSON keys are strings)
    flops: float = 0.0  # matmul FLOPs of training so far, all processes together (eval/flops.py)
    scaler: dict = field(default_factory=dict)  # fp16's GradScaler state; empty when it is off
    world_size: int = 1  # processes that took the steps so far: with another number the data order changes


def optimizer_tensors(optimizer_state: dict) -> tuple[dict[str, torch.Tensor], list]:
    """Split an optimizer state dict keyed by parameter name into tensors (``optimizer.<param>.<name>``)
    and its JSON-able parameter groups."""
    tensors = {}
    for parameter, values in optimizer_state["state"].items():
        for name, value in values.items():
            tensors[f"{OPTIMIZER_PREFIX}{parameter}.{name}"] = torch.as_tensor(value).contiguous()
    return tensors, optimizer_state["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    """The inverse of ``optimizer_tensors``: a state dict for ``set_optimizer_state_dict``."""
    state = {}
    for key, tensor in tensors.items():
        parameter, name = key[len(OPTIMIZER_PREFIX):].rsplit(".", 1)  # a parameter's name has dots; AdamW's keys none
        state.setdefault(parameter, {})[name] = tensor
    return {"state": state, "param_groups": param_groups}


def rng_states(world: World) -> dict[str, torch.Tensor]:
    """Every rank's random-number states, gathered (a collective): ``rng.torch.<rank>`` and ``rng.cuda.<rank>``."""
    states = {f"{RNG_PREFIX}torch.{rank}": state for rank, state in enumerate(gather_tensors(torch.get_rng_state()))}
    if world.device.type == "cuda":
        gathered = gather_tensors(torch.cuda.get_rng_state(world.device))
        states.update({f"{RNG_PREFIX}cuda.{rank}": state for rank, state in enumerate(gathered)})
    return states


def previous_checkpoint(path: Path) -> Path:
    """The file that keeps the checkpoint before ``path``: ``checkpoint.previous.safetensors`` beside it."""
    path = Path(path)
    return path.with_name(f"{path.stem}.previous{path.suffix}")


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState,
                    world: World = World()) -> None:
    """Write the LoRA weights, the optimizer, the random states and ``state`` to ``path`` atomically.

    The checkpoint that was at ``path`` becomes ``previous_checkpoint(path)``, replacing the one
    there, once the new file is written whole. Every rank calls it (the weights, the optimizer
    state and the random states are gathered whole); rank 0 writes, and the others wait at a
    barrier until the file is in place.
    """
    weights = trainable_state(model)  # collectives first, on every rank; rank 0 gets everything whole
    whole_optimizer = get_optimizer_state_dict(model, optimizer, options=WHOLE)
    random_states = rng_states(world)
    if world.is_main:
        tensors = {KEY_PREFIX + name: tensor.contiguous() for name, tensor in weights.items()}
        moments, param_groups = optimizer_tensors(whole_optimizer)
        tensors.update(moments)
        tensors.update(random_states)
        metadata = {
            "run_state": json.dumps(asdict(state)),
            "param_groups": json.dumps(param_groups),
            "python_random": json.dumps(random.getstate()),
        }
        write_atomically(Path(path), lambda temporary: save_file(tensors, temporary, metadata=metadata),
                         previous=previous_checkpoint(path))
    barrier()


def read_checkpoint(path: Path, with_tensors: bool = True) -> tuple[RunState, dict, dict[str, torch.Tensor]]:
    """The run state, the parsed header and (``with_tensors``) the tensors of the checkpoint at ``path``.

    Opening the file checks it whole without reading a tensor: safetensors refuses a file whose
    length differs from what its header says (a truncated one) and a header that is not JSON.
    The header's values are JSON themselves, and are parsed here too. (A flipped bit inside a
    tensor's bytes is not caught: safetensors stores no checksum.)

    Returns:
        ``(state, header, tensors)``: ``header`` holds ``param_groups`` and ``python_random``,
        parsed; ``tensors`` is empty unless ``with_tensors``.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: not a readable safetensors file, or not a checkpoint written by this version.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (one is written every --checkpoint-every steps)")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()} if with_tensors else {}
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable checkpoint ({error})") from None
    if "run_state" not in metadata:
        raise ValueError(f"{path}: not a checkpoint written by save_checkpoint (no run_state in its header)")
    try:
        values = json.loads(metadata["run_state"])
        header = {key: json.loads(metadata[key]) for key in ("param_groups", "python_random")}
    except (KeyError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: a damaged header ({type(error).__name__}: {error}); resume from another checkpoint "
                         "or start a new run") from None
    names = sorted(spec.name for spec in fields(RunState))
    if not isinstance(values, dict) or sorted(values) != names:
        raise ValueError(f"{path}: its run_state has fields {sorted(values) if isinstance(values, dict) else values}, "
                         f"this version keeps {names}; start a new run")
    return RunState(**values), header, tensors


def choose_checkpoint(path: Path) -> tuple[Path, str]:
    """The checkpoint a resumed run loads, and a warning line ("" when it is the newest).

    ``path`` (the newest) when it opens as a checkpoint (``read_checkpoint``'s checks); else the
    one before it, ``previous_checkpoint(path)``, and then the unreadable newest is renamed to
    ``<name>.unreadable`` (kept to look at; the next checkpoint must not make it the previous).
    Under torchrun rank 0 alone calls this and tells the other ranks its choice, so every rank
    loads the same file. A checkpoint that opens but does not fit the model is no reason to fall
    back: ``load_checkpoint`` names that.

    Returns:
        ``(checkpoint, warning)``; the warning names the unreadable file, why, and the step the
        run resumes from, on one line.

    Raises:
        FileNotFoundError: neither file exists.
        ValueError: neither is readable; the message names both, on one line.
    """
    path = Path(path)
    previous = previous_checkpoint(path)
    if not path.is_file() and not previous.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (one is written every --checkpoint-every steps)")
    try:
        read_checkpoint(path, with_tensors=False)
        return path, ""
    except FileNotFoundError:
        problem = f"{path}: no such file"
    except ValueError as error:
        problem = str(error)
    try:
        state, _, _ = read_checkpoint(previous, with_tensors=False)
    except (FileNotFoundError, ValueError) as error:
        raise ValueError(f"no readable checkpoint to resume from: {problem}; {error}") from None
    warning = f"warning: {problem}; resuming from {previous.name}, of step {state.step}"
    if path.is_file():
        aside = path.with_name(path.name + UNREADABLE_SUFFIX)
        path.replace(aside)
        warning += f" (the unreadable file is kept as {aside.name})"
    return previous, warning


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    world: World = World()) -> RunState:
    """Restore the LoRA weights, optimizer and random states from ``path``; return the run's state.

    Every rank reads the file and keeps its own part (under FSDP2, its shards). A rank that the
    saving run did not have (more processes now) takes rank 0's random state.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the file is not a checkpoint of this model's LoRA layers.
    """
    path = Path(path)
    state, header, tensors = read_checkpoint(path)
    weights = adapter_state_dict(unwrap(model))  # under FSDP2, shards: their .shape is the whole tensor's
    missing = sorted(set(weights) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]}; the checkpoint is of another model or adapter")
    for key, parameter in weights.items():
        if parameter.shape != tensors[key].shape:
            raise ValueError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                             f"the model needs {tuple(parameter.shape)}")
    whole = StateDictOptions(full_state_dict=True, strict=False)  # strict=False: the frozen base is not in the file
    set_model_state_dict(model, {key[len(KEY_PREFIX):]: tensors[key] for key in weights}, options=whole)
    moments = {key: tensor for key, tensor in tensors.items() if key.startswith(OPTIMIZER_PREFIX)}
    set_optimizer_state_dict(model, optimizer, optimizer_state(moments, header["param_groups"]),
                             options=StateDictOptions(full_state_dict=True))
    rank = world.rank if f"{RNG_PREFIX}torch.{world.rank}" in tensors else 0
    torch.set_rng_state(tensors[f"{RNG_PREFIX}torch.{rank}"])
    if world.device.type == "cuda" and f"{RNG_PREFIX}cuda.{rank}" in tensors:
        torch.cuda.set_rng_state(tensors[f"{RNG_PREFIX}cuda.{rank}"], world.device)
    version, python_state, gauss = header["python_random"]
    random.setstate((version, tuple(python_state), gauss))
    return state
