"""Fine-tune a causal language model with LoRA, in a raw PyTorch loop: no accelerate, no Trainer.

    python -m training.loop                      # LLMTIME forecasting on the embedded SmolLM2
    python -m training.loop --task instruct      # the embedded instruction tasks
    python -m training.loop --help               # every setting, with its default and advice
    python -m training.loop --resume runs/NAME   # continue a run from its last checkpoint

The run reads top to bottom in ``train``, in numbered steps. Everything it writes goes to
``runs/<name>/``: ``config.json``, ``metrics.jsonl``, ``checkpoint.safetensors``, ``adapter/``
(peft's format) and ``loss.png``.
"""

import json
import math
import random
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from eval.flops import flops_of_model, format_flops
from eval.perplexity import summed_token_nll
from lora import inject_lora, quantize_model, save_adapter, trainable_parameters_line, use_fused_lora
from lora.adapter import write_atomically
from training.checkpoint import load_checkpoint, save_checkpoint
from training.collate import PadCollator, length_grouped_batches
from training.config import TrainConfig, parse_config
from training.models import load_model
from training.plot import plot_losses
from training.schedule import get_lr
from training.sequences import pad_token_id
from training.tasks import build_task


class BadInput(Exception):
    """A setting, model name or data file that cannot work: reported in one line, exit status 2."""


class Diverged(Exception):
    """The loss became NaN or infinite: the run stops, keeping its last good checkpoint."""


@dataclass
class Precision:
    """How the forward pass runs: autocast dtype (None for plain fp32), and fp16's gradient scaler."""

    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler | None

    @property
    def name(self) -> str:
        return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.dtype]


def cpu_supports_bf16() -> bool:
    """Whether this CPU has native bf16 arithmetic (AVX512-BF16 or AMX), where bf16 autocast is fast."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_precision(requested: str, device: torch.device) -> Precision:
    """``auto``: bf16 where the device computes it natively, fp16 with a gradient scaler on older GPUs, else fp32."""
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "bf16" if cpu_supports_bf16() else "fp32"
    if requested == "fp16":
        if device.type != "cuda":
            raise BadInput("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on the CPU")
        return Precision(torch.float16, torch.amp.GradScaler("cuda"))
    return Precision({"bf16": torch.bfloat16, "fp32": None}[requested], None)


def micro_batch_indices(n_examples: int, lengths: list[int], batch_size: int, seed: int):
    """``indices(m)``: the example indices of micro-batch m (counted over the whole run).

    Each epoch has its own seeded plan (length-grouped, so instruction batches carry little
    padding), so micro-batch m is the same whenever it is asked for: that is what lets a
    resumed run see exactly the batches the uninterrupted run would have.
    """
    plans = {}

    def indices(m: int) -> list[int]:
        per_epoch = math.ceil(n_examples / batch_size)
        epoch, position = divmod(m, per_epoch)
        if epoch not in plans:
            plans.clear()
            plans[epoch] = length_grouped_batches(lengths, batch_size, seed=seed + epoch)
        return plans[epoch][position]

    return indices


@torch.no_grad()
def evaluate(model, batches: list[dict], device, precision: Precision) -> float:
    """Mean cross-entropy per predicted token over ``batches`` (labels -100 excluded)."""
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        batch = {key: value.to(device) for key, value in batch.items()}
        nll, n = summed_token_nll(model, batch, autocast=lambda: autocast(device, precision))
        total, count = total + nll, count + n
    model.train()
    return total / max(count, 1)


def autocast(device, precision: Precision):
    if precision.dtype is None:
        return nullcontext()
    return torch.autocast(device.type, dtype=precision.dtype)


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def keep_metrics_up_to(path: Path, step: int) -> None:
    """Drop the metrics logged after ``step``: a resumed run logs those steps again."""
    if path.is_file():
        lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
        write_atomically(path, lambda temporary: temporary.write_text("".join(line + "\n" for line in lines)))


def train(config: TrainConfig, resume: Path | None = None) -> dict:
    """Run the training ``config`` describes (or continue the run in ``resume``); return a summary.

    Raises:
        BadInput: a model, data file or setting that cannot work, found before anything is written.
        Diverged: the loss became NaN or infinite.
    """
    start_time = time.perf_counter()

    # 1. Seed everything that draws random numbers: LoRA's A, dropout, the data order.
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = choose_precision(config.precision, device)

    # 2. The pretrained model, in fp32: autocast computes in bf16/fp16, the weights and the
    #    optimizer stay in fp32.
    try:
        model, tokenizer = load_model(config.model)
        data = build_task(config, tokenizer)
    except (FileNotFoundError, ValueError) as error:
        raise BadInput(str(error)) from None
    if not data.train or not data.validation:
        raise BadInput(f"no training or validation examples in {config.data or config.task}")
    model.to(device)
    model.config.use_cache = False  # the KV cache is for generation; training recomputes everything

    # 3. LoRA on the targets; everything else frozen (and, with --quantize nf4, held in 4 bits first).
    if config.quantize == "nf4":
        quantize_model(model, double_quant=config.double_quant)
    try:
        targets = inject_lora(model, config.target_modules, r=config.r, alpha=config.alpha, dropout=config.dropout)
    except (ValueError, TypeError) as error:
        raise BadInput(str(error)) from None
    use_fused_lora(model, {"auto": None, "fused": True, "plain": False}[config.lora_path])
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing recomputes activations without needing the input to
        # require grad, so the gradients of A and B still flow through a frozen base.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    # 4. AdamW over A and B only: the frozen base has no gradients and no optimizer state.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    collate = PadCollator(pad_token_id(tokenizer))
    lengths = [len(example["input_ids"]) for example in data.train]
    batch_indices = micro_batch_indices(len(data.train), lengths, config.batch_size, config.seed)
    max_steps = config.max_steps
    if config.epochs > 0:
        max_steps = max(1, round(config.epochs * math.ceil(len(data.train) / config.batch_size) / config.grad_accum))
    # The same validation batches every time, spread over the whole validation set.
    n_eval = min(len(data.validation), config.eval_batches * config.batch_size)
    picks = [round(i * (len(data.validation) - 1) / max(n_eval - 1, 1)) for i in range(n_eval)]
    eval_batches = [collate([data.validation[i] for i in picks[j : j + config.batch_size]])
                    for j in range(0, n_eval, config.batch_size)]

    # 5. The run folder: new, or the one being resumed.
    run = resume or Path(config.out) / (config.name or f"{config.task}-{time.strftime('%Y%m%d-%H%M%S')}")
    metrics_path, checkpoint_path = run / "metrics.jsonl", run / "checkpoint.safetensors"
    step, best, evals_since_best, history, last_checkpoint, flops = 0, math.inf, 0, {}, None, 0.0
    if resume is not None:
        try:
            step, extra = load_checkpoint(checkpoint_path, model, optimizer)
        except (FileNotFoundError, ValueError) as error:
            raise BadInput(str(error)) from None
        last_checkpoint = step
        best, evals_since_best, history = extra["best"], extra["evals_since_best"], extra["history"]
        flops = extra.get("flops", 0.0)
        if precision.scaler is not None and extra.get("scaler"):
            precision.scaler.load_state_dict(extra["scaler"])
        keep_metrics_up_to(metrics_path, step)
    elif run.exists():
        raise BadInput(f"{run} exists; pick another --name, or continue it with --resume {run}")
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(config.to_json())

    print(f"model {config.model} on {device} ({precision.name}); LoRA r={config.r} alpha={config.alpha} "
          f"on {len(targets)} modules ({config.targets})")
    print(trainable_parameters_line(model))
    print(data.description)
    print(f"{max_steps} steps of {config.grad_accum} x {config.batch_size} sequences; writing to {run}/")

    def checkpoint():
        nonlocal last_checkpoint
        last_checkpoint = step
        save_checkpoint(checkpoint_path, model, optimizer, step, best=best, evals_since_best=evals_since_best,
                        history=history, flops=flops,
                        scaler=precision.scaler.state_dict() if precision.scaler else None)

    def validate():
        nonlocal best, evals_since_best
        loss = evaluate(model, eval_batches, device, precision)
        history[str(step)] = loss
        append_metrics(metrics_path, {"step": step, "val_loss": loss})
        if loss < best:
            best, evals_since_best = loss, 0
        else:
            evals_since_best += 1
        return loss

    # Matmul FLOPs of training, counted from the model's shape (eval/flops.py), per padded length.
    flops_per_sequence = {}

    def batch_flops(batch) -> float:
        rows, length = batch["input_ids"].shape
        if length not in flops_per_sequence:
            flops_per_sequence[length] = flops_of_model(model, length).total
        return rows * flops_per_sequence[length]

    try:
        batch_flops({"input_ids": torch.zeros(1, config.max_length)})
    except ValueError as error:  # targets the analytic count does not model (not in every layer, say)
        print(f"note: FLOPs are not counted: {error}")
        batch_flops = None

    if step == 0:
        validate()
    tokens_seen, window_tokens, window_start = 0, 0, time.perf_counter()
    bar = tqdm(total=max_steps, initial=step, desc="training", dynamic_ncols=True)

    # 6. The loop: one optimizer step per iteration.
    while step < max_steps:
        lr = get_lr(step, config.lr, config.min_lr, config.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 6a. Forward and backward over grad_accum micro-batches; gradients add up in .grad.
        step_loss = 0.0
        for m in range(step * config.grad_accum, (step + 1) * config.grad_accum):
            batch = collate([data.train[i] for i in batch_indices(m)])
            batch = {key: value.to(device) for key, value in batch.items()}
            with autocast(device, precision):
                # transformers shifts the labels inside: position t is scored on token t + 1.
                loss = model(**batch).loss / config.grad_accum
            if not torch.isfinite(loss):
                bar.close()
                kept = (f"the last good checkpoint, of step {last_checkpoint}, stays in {checkpoint_path}"
                        if last_checkpoint is not None else "no checkpoint had been written yet")
                raise Diverged(f"the loss is {loss.item()} at step {step + 1}; {kept}; lower --lr and try again")
            (precision.scaler.scale(loss) if precision.scaler else loss).backward()
            step_loss += loss.item()
            window_tokens += int(batch["attention_mask"].sum())
            flops += batch_flops(batch) if batch_flops else 0.0

        # 6b. Clip the gradient norm, step AdamW, clear the gradients.
        if precision.scaler:
            precision.scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or math.inf).item()
        if precision.scaler:
            precision.scaler.step(optimizer)
            precision.scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1

        # 6c. Log, validate, checkpoint.
        elapsed = time.perf_counter() - window_start
        tokens_per_second = window_tokens / elapsed if elapsed > 0 else 0.0
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:.0f}")
        bar.update(1)
        if step % config.log_every == 0 or step == max_steps:
            append_metrics(metrics_path, {"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                                          "tokens_per_second": tokens_per_second, "flops": flops})
        tokens_seen += window_tokens
        stop_early = False
        if step % config.eval_every == 0 or step == max_steps:
            validate()
            stop_early = config.early_stop and evals_since_best >= config.early_stop
        if step % config.checkpoint_every == 0 or step == max_steps or stop_early:
            checkpoint()
        if stop_early:
            print(f"early stop at step {step}: {config.early_stop} evaluations without a better validation loss")
            break
        window_tokens, window_start = 0, time.perf_counter()  # tokens/s counts training, not validation
    bar.close()

    # 7. The adapter, the loss curve, the summary.
    save_adapter(model, run / "adapter", base_model_name_or_path=config.model)
    plotted = plot_losses(metrics_path, run / "loss.png")
    summary = {
        "steps": step,
        "seconds": round(time.perf_counter() - start_time, 1),
        "tokens": tokens_seen,
        "flops": flops,
        "val_loss_start": history.get("0"),
        "val_loss_end": history.get(str(step)),
        "run": str(run),
        "adapter": str(run / "adapter"),
        "loss_png": str(run / "loss.png") if plotted else None,
    }
    print(f"done: {summary['steps']} steps in {summary['seconds']} s, {tokens_seen:,} tokens this session, "
          f"{format_flops(flops)}FLOP of matmuls in all; "
          f"validation loss {summary['val_loss_start']:.4f} at step 0 -> {summary['val_loss_end']:.4f} at step {step}")
    print(f"saved: {run}/adapter (peft format), {run}/metrics.jsonl, {run}/checkpoint.safetensors"
          + (f", {run}/loss.png" if plotted else ""))
    return summary


def main(argv=None) -> int:
    try:
        config, resume = parse_config(argv)
    except ValueError as error:  # a setting that cannot work; nothing has been written
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        train(config, resume)
    except BadInput as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Diverged as error:
        print(f"stopped: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
