"""Resumable checkpoints: everything a run needs to continue exactly, in one safetensors file.

A checkpoint holds the LoRA weights, AdamW's moment estimates, the random-number states that
drive dropout and data order, and the step. Tensors go in the safetensors body; the rest
(step, optimizer hyperparameters, Python's random state) goes in its JSON header as strings.
Loading therefore never unpickles anything, unlike ``torch.load`` of a pickled state dict.

The file is written to a temporary name and renamed into place, so a run killed at any
moment leaves the previous checkpoint whole.
"""

import json
import random
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from lora import adapter_state_dict
from lora.adapter import write_atomically

OPTIMIZER_PREFIX = "optimizer."
RNG_KEY = "rng.torch"


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


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, **extra) -> None:
    """Write the state after ``step`` optimizer steps to ``path`` atomically.

    ``extra`` holds JSON-able values the loop wants back (best validation loss, a grad
    scaler's state, ...).
    """
    tensors = {key: tensor.contiguous() for key, tensor in adapter_state_dict(model).items()}
    moments, param_groups = optimizer_tensors(optimizer)
    tensors.update(moments)
    tensors[RNG_KEY] = torch.get_rng_state()
    if torch.cuda.is_available():
        for device, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{device}"] = state
    metadata = {
        "step": json.dumps(step),
        "param_groups": json.dumps(param_groups),
        "python_random": json.dumps(random.getstate()),
        "extra": json.dumps(extra),
    }
    write_atomically(Path(path), lambda temporary: save_file(tensors, temporary, metadata=metadata))


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[int, dict]:
    """Restore the LoRA weights, optimizer and random states from ``path``; return ``(step, extra)``.

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
    if "step" not in metadata:
        raise ValueError(f"{path}: not a checkpoint written by save_checkpoint (no step in its header)")

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
    version, state, gauss = json.loads(metadata["python_random"])
    random.setstate((version, tuple(state), gauss))
    return json.loads(metadata["step"]), json.loads(metadata["extra"])
