"""Full fine-tuning of some Linear weights of a model, everything else frozen: the ΔW that LoRA approximates.

LoRA's bet (``experiments/spectrum.py``) is about the update full fine-tuning would make,
ΔW = W_after - W0. ``full_finetune`` makes that update, for the q_proj and v_proj weights the
LoRA paper adapts, with the training loop's own pieces (``training/loop.py``), and hands back
W0 and ΔW per module for ``python -m experiments.delta_w`` to measure.
"""

import math
import time
from dataclasses import dataclass

import torch
from tqdm import tqdm

from data.collate import PadCollator
from data.sequences import pad_token_id
from eval.perplexity import summed_nll
from lora import cast_frozen
from lora.targets import find_targets
from models.precision import choose_precision
from training.loop import accumulate_gradients, step_plan, validation_examples
from training.schedule import get_lr


KINDS = ("q_proj", "v_proj")  # the LoRA paper's choice of targets, and the training loop's default


@dataclass
class FullFineTune:
    """What ``full_finetune`` leaves: W0 and ΔW = W_after - W0 per module name (float32, on the CPU)."""

    weights: dict[str, torch.Tensor]
    deltas: dict[str, torch.Tensor]
    val_loss_start: float
    val_loss_end: float
    seconds: float


def full_finetune(model, data, tokenizer, steps: int, lr: float = 1e-4, kinds=KINDS, batch_size: int = 2,
                  seed: int = 0, warmup_steps: int = 10, eval_examples: int = 16) -> FullFineTune:
    """Fully fine-tune the weights of the ``kinds`` Linear modules of ``model`` (loaded in fp32); freeze the rest.

    The pieces are the training loop's (``training/loop.py``): its batch plan, its token-weighted
    gradient accumulation, its warm-up and cosine schedule (down to lr / 10), gradient clipping
    at 1 and bf16 autocast where the CPU has it. What differs is what trains: whole weights,
    held in fp32 (``cast_frozen`` rounds only the frozen rest to the compute dtype), as AdamW's
    small steps need. ``model`` is changed in place.
    """
    start = time.perf_counter()
    torch.manual_seed(seed)
    precision = choose_precision("auto", torch.device("cpu"))
    names = find_targets(model, list(kinds))
    modules = {name: model.get_submodule(name) for name in names}
    model.requires_grad_(False)
    for module in modules.values():
        module.weight.requires_grad_(True)
    weights = {name: module.weight.detach().float().clone() for name, module in modules.items()}
    cast_frozen(model, precision.base_dtype)
    model.config.use_cache = False
    pad_id = pad_token_id(tokenizer)
    held_out = validation_examples(data.validation, eval_examples)
    val_loss_start = summed_nll(model, held_out, pad_id, batch_size, precision)
    trainable = [module.weight for module in modules.values()]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)  # decay would pull W toward 0, not W0
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # bf16 and fp32 need no loss scaling
    collate = PadCollator(pad_id)
    plan = step_plan([len(example["input_ids"]) for example in data.train], batch_size, 1, seed)
    model.train()
    for step in tqdm(range(steps), desc="full fine-tuning", dynamic_ncols=True):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(step, lr, lr / 10, min(warmup_steps, steps // 10), steps)
        micro_batches = [collate([data.train[i] for i in indices]) for _, indices in plan(step)]
        loss = accumulate_gradients(model, micro_batches, precision, scaler)
        if not math.isfinite(loss):
            raise RuntimeError(f"the loss is {loss} at step {step + 1}; lower --lr and try again")
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    val_loss_end = summed_nll(model, held_out, pad_id, batch_size, precision)
    deltas = {name: modules[name].weight.detach().float() - weights[name] for name in names}
    return FullFineTune(weights, deltas, val_loss_start[0] / val_loss_start[1], val_loss_end[0] / val_loss_end[1],
                        time.perf_counter() - start)
