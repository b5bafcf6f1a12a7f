"""Resumable checkpoints: everything a run needs to continue exactly, in one safetensors file.

A checkpoint holds the LoRA weights, AdamW's moment estimates, the random-number states that
drive dropout and data order, and the loop's ``RunState`` (the step, the best validation loss,
...). Tensors go in the safetensors body; the rest (the run state, optimizer hyperparameters,
Python's random state) goes in its JSON header as strings.
Loading therefore never unpickles anything, unlike ``torch.load`` of a pickled state dict.

The file is written to a temporary name and renamed into place, so a run killed at any
moment leaves the previous checkpoint whole.
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

from lora import adapter_state_dict
from lora.atomic import write_atomically

OPTIMIZER_PREFIX = "optimizer."
RNG_KEY = "rng.torch"


@dataclass
class RunState:
    """What the training loop carries from step to step, saved and restored whole by a checkpoint."""

    step: int = 0  # optimizer steps taken
    best: float = math.inf  # the lowest validation loss so far
    evals_since_best: int = 0  # validations since it, for --early-stop
    history: dict[str, float] = field(default_factory=dict)  # validation loss by step (JSON keys are strings)
    flops: float = 0.0  # matmul FLOPs of training so far (eval/flops.py)
    scaler: dict = field(default_factory=dict)  # fp16's GradScaler state; empty when it is off


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list]:
    """Split ``optimizer.state_dict()`` into tensors (keyed ``optimizer.<param>.<name>``) and its JSON-able groups."""
    state = optimizer.state_dict()
    tensors = {}
    for index, values in state["state"].items():
        for name, value in values.items():
            tensors[f"{OPTIMIZER_PREFIX}{index}.{name}"] = torch.as_tensor(value).contiguous()
    return tensors, state["param_groups"]


def optimizer_state(tensors: dict[str, torch.Tensor], param_groups: list) -> dict:
    """The inverse of ``optimizer_tensors``: a state dict for ``optimizer.load_state_dict``."""
    state = {}
    for key, tensor in tensors.items():
        index, name = key[len(OPTIMIZER_PREFIX):].split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    return {"state": state, "param_groups": param_groups}


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: RunState) -> None:
    """Write the LoRA weights, the optimizer, the random states and ``state`` to ``path`` atomically."""
    tensors = {key: tensor.contiguous() for key, tensor in adapter_state_dict(model).items()}
    moments, param_groups = optimizer_tensors(optimizer)
    tensors.update(moments)
    tensors[RNG_KEY] = torch.get_rng_state()
    if torch.cuda.is_available():
        for device, rng_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device}"] = rng_state
    metadata = {
        "run_state": json.dumps(asdict(state)),
        "param_groups": json.dumps(param_groups),
        "python_random": json.dumps(random.getstate()),
    }
    write_atomically(Path(path), lambda temporary: save_file(tensors, temporary, metadata=metadata))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> RunState:
    """Restore the LoRA weights, optimizer and random states from ``path``; return the run's state.

    Raises:
        FileNotFoundError: no checkpoint at ``path``.
        ValueError: the file is not a checkpoint of this model's LoRA layers.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no checkpoint to resume from (one is written every --checkpoint-every steps)")
    try:
        with safe_open(path, framework="pt") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except SafetensorError as error:
        raise ValueError(f"{path}: not a readable checkpoint ({error})") from None
    if "run_state" not in metadata:
        raise ValueError(f"{path}: not a checkpoint written by save_checkpoint (no run_state in its header)")
    values = json.loads(metadata["run_state"])
    if set(values) != {spec.name for spec in fields(RunState)}:
        raise ValueError(f"{path}: its run_state has fields {sorted(values)}, this version keeps "
                         f"{sorted(spec.name for spec in fields(RunState))}; start a new run")

    weights = adapter_state_dict(model)
    missing = sorted(set(weights) - set(tensors))
    if missing:
        raise ValueError(f"{path}: missing tensor {missing[0]}; the checkpoint is of another model or adapter")
    with torch.no_grad():
        for key, parameter in weights.items():
            if parameter.shape != tensors[key].shape:
                raise ValueError(f"{path}: tensor {key} has shape {tuple(tensors[key].shape)}, "
                                 f"the model needs {tuple(parameter.shape)}")
            parameter.copy_(tensors[key])
    moments = {key: tensor for key, tensor in tensors.items() if key.startswith(OPTIMIZER_PREFIX)}
    optimizer.load_state_dict(optimizer_state(moments, json.loads(metadata["param_groups"])))
    torch.set_rng_state(tensors[RNG_KEY])
    cuda_states = [tensors[key] for key in sorted(tensors) if key.startswith("rng.cuda.")]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, python_state, gauss = json.loads(metadata["python_random"])
    random.setstate((version, tuple(python_state), gauss))
    return RunState(**values)
