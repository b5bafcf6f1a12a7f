"""Fine-tune a causal language model with LoRA, in a raw PyTorch loop: no accelerate, no Trainer.

    python -m training.loop                      # LLMTIME forecasting on the embedded SmolLM2
    python -m training.loop --task instruct      # the embedded instruction tasks
    python -m training.loop --help               # every setting, with its default and advice
    python -m training.loop --resume runs/NAME   # continue a run from its last checkpoint

The run reads top to bottom in ``train``, in numbered steps; each piece it calls is a small
function above it. Everything it writes goes to ``runs/<name>/``: ``config.json``,
``metrics.jsonl``, ``checkpoint.safetensors``, ``adapter/`` (peft's format) and ``loss.png``.
"""

import functools
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from data.collate import PadCollator, length_grouped_batches
from data.sequences import pad_token_id
from data.tasks import build_task
from eval.flops import flops_of_model, format_flops
from eval.perplexity import label_tokens, perplexity, summed_token_nll
from lora import inject_lora, quantize_model, save_adapter, trainable_parameters_line, use_fused_lora
from lora.atomic import write_atomically
from models.loader import load_model
from models.precision import Precision, choose_precision
from training.checkpoint import RunState, load_checkpoint, save_checkpoint
from training.config import TrainConfig, parse_config
from training.plot import plot_losses
from training.schedule import get_lr


class BadInput(Exception):
    """A setting, model name or data file that cannot work: reported in one line, exit status 2."""


class Diverged(Exception):
    """The loss became NaN or infinite: the run stops, keeping its last good checkpoint."""


def step_plan(lengths: list[int], batch_size: int, grad_accum: int, seed: int):
    """``plan(step)``: the example indices of each of the ``grad_accum`` micro-batches of optimizer step ``step``.

    Each epoch has its own seeded plan (length-grouped, so instruction batches carry little
    padding), so step s gets the same batches whenever it is asked for: that is what lets a
    resumed run see exactly the batches the uninterrupted run would have.
    """
    per_epoch = math.ceil(len(lengths) / batch_size)

    @functools.lru_cache(maxsize=1)  # one epoch's plan at a time
    def epoch_plan(epoch: int) -> list[list[int]]:
        return length_grouped_batches(lengths, batch_size, seed=seed + epoch)

    def plan(step: int) -> list[list[int]]:
        micro_batches = range(step * grad_accum, (step + 1) * grad_accum)  # counted over the whole run
        return [epoch_plan(m // per_epoch)[m % per_epoch] for m in micro_batches]

    return plan


def total_steps(config: TrainConfig, n_train: int) -> int:
    """``--max-steps``, or with ``--epochs`` the optimizer steps that many passes over the data take."""
    if config.epochs > 0:
        return max(1, round(config.epochs * math.ceil(n_train / config.batch_size) / config.grad_accum))
    return config.max_steps


def validation_examples(validation: list[dict], n: int) -> list[dict]:
    """``n`` examples spread evenly over the validation set: the same ones at every validation."""
    n = min(len(validation), n)
    return [validation[round(i * (len(validation) - 1) / max(n - 1, 1))] for i in range(n)]


def flop_counter(model, max_length: int):
    """``count(batch)``: the matmul FLOPs of one training step on ``batch``, from the model's shape (eval/flops.py)."""
    try:
        flops_of_model(model, max_length)
    except ValueError as error:  # targets the analytic count does not model (not in every layer, say)
        print(f"note: FLOPs are not counted: {error}")
        return lambda batch: 0.0
    per_sequence = functools.cache(lambda length: flops_of_model(model, length).total)
    return lambda batch: batch["input_ids"].shape[0] * per_sequence(batch["input_ids"].shape[1])


def accumulate_gradients(model, micro_batches: list[dict], precision: Precision, scaler) -> float:
    """Forward and backward over the micro-batches of one optimizer step; return the step's loss.

    The loss is the mean over every labelled token of the step, wherever it sits: each micro-batch
    adds its summed token loss divided by the label tokens of the *whole step*. Dividing each
    micro-batch's own mean by their number instead would weigh a micro-batch of 3 answer tokens
    as much as one of 300 (the bug transformers fixed in 2024 with ``num_items_in_batch``).
    """
    n_tokens = max(sum(label_tokens(batch) for batch in micro_batches), 1)
    step_loss = 0.0
    for batch in micro_batches:
        loss = summed_token_nll(model, batch, precision) / n_tokens
        scaler.scale(loss).backward()  # gradients add up in .grad
        step_loss += loss.item()
    return step_loss


def validate(model, examples: list[dict], pad_id: int, batch_size: int, precision: Precision, state: RunState,
             metrics_path: Path) -> None:
    """The validation loss (per token, as training's): logged, and recorded in ``state``'s history and best."""
    loss = perplexity(model, examples, pad_id, batch_size, precision=precision)["loss"]
    state.history[str(state.step)] = loss
    state.best, state.evals_since_best = (loss, 0) if loss < state.best else (state.best, state.evals_since_best + 1)
    append_metrics(metrics_path, {"step": state.step, "val_loss": loss})


def append_metrics(path: Path, record: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(record) + "\n")


def open_run(config: TrainConfig, resume: Path | None, model, optimizer, scaler) -> tuple[Path, RunState]:
    """The run folder and the state to start from: a new folder, or the one being resumed at its checkpoint."""
    if resume is None:
        run = Path(config.out) / (config.name or f"{config.task}-{time.strftime('%Y%m%d-%H%M%S')}")
        if run.exists():
            raise BadInput(f"{run} exists; pick another --name, or continue it with --resume {run}")
        state = RunState()
    else:
        run = resume
        try:
            state = load_checkpoint(run / "checkpoint.safetensors", model, optimizer)
        except (FileNotFoundError, ValueError) as error:
            raise BadInput(str(error)) from None
        if state.scaler:
            scaler.load_state_dict(state.scaler)
        metrics = run / "metrics.jsonl"  # a resumed run logs the steps after its checkpoint again
        if metrics.is_file():
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= state.step]
            write_atomically(metrics, lambda temporary: temporary.write_text("".join(line + "\n" for line in kept)))
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.json").write_text(config.to_json())
    return run, state


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

    # 2. The pretrained model in fp32 (autocast computes in bf16/fp16; weights and optimizer stay fp32), the data.
    try:
        precision = choose_precision(config.precision, device)
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
    use_fused_lora(model, config.lora_path == "fused")
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing recomputes activations without needing the input to
        # require grad, so the gradients of A and B still flow through a frozen base.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    # 4. AdamW over A and B only: the frozen base has no gradients and no optimizer state. fp16
    #    alone needs its loss scaled; for bf16 and fp32 the scaler is off and passes values through.
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.needs_loss_scaling)
    pad_id = pad_token_id(tokenizer)
    collate = PadCollator(pad_id)
    plan = step_plan([len(example["input_ids"]) for example in data.train], config.batch_size, config.grad_accum,
                     config.seed)
    max_steps = total_steps(config, len(data.train))
    held_out = validation_examples(data.validation, config.eval_batches * config.batch_size)
    count_flops = flop_counter(model, config.max_length)

    # 5. The run folder and the state to start from (step 0, or the resumed checkpoint's).
    run, state = open_run(config, resume, model, optimizer, scaler)
    metrics_path, checkpoint_path, checkpointed = run / "metrics.jsonl", run / "checkpoint.safetensors", state.step
    print(f"model {config.model} on {device} ({precision.name}); LoRA r={config.r} alpha={config.alpha} "
          f"on {len(targets)} modules ({config.targets}), {config.lora_path} path")
    print(trainable_parameters_line(model))
    print(data.description)
    print(f"{max_steps} steps of {config.grad_accum} x {config.batch_size} sequences; writing to {run}/")
    if state.step == 0:
        validate(model, held_out, pad_id, config.batch_size, precision, state, metrics_path)
    tokens_seen = 0
    bar = tqdm(total=max_steps, initial=state.step, desc="training", dynamic_ncols=True)

    # 6. The loop: one optimizer step per iteration.
    while state.step < max_steps:
        step_start = time.perf_counter()
        lr = get_lr(state.step, config.lr, config.min_lr, config.warmup_steps, max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr

        # 6a. Forward and backward over the step's micro-batches, every label token weighing the same.
        micro_batches = [{key: value.to(device) for key, value in collate([data.train[i] for i in indices]).items()}
                         for indices in plan(state.step)]
        loss = accumulate_gradients(model, micro_batches, precision, scaler)
        if not math.isfinite(loss):
            bar.close()
            kept = (f"the last good checkpoint, of step {checkpointed}, stays in {checkpoint_path}"
                    if checkpoint_path.is_file() else "no checkpoint had been written yet")
            raise Diverged(f"the loss is {loss} at step {state.step + 1}; {kept}; lower --lr and try again")

        # 6b. Clip the gradient norm, step AdamW, clear the gradients.
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm or math.inf).item()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.flops += sum(count_flops(batch) for batch in micro_batches)

        # 6c. Log, validate, checkpoint.
        tokens = sum(int(batch["attention_mask"].sum()) for batch in micro_batches)
        tokens_seen, tokens_per_second = tokens_seen + tokens, tokens / (time.perf_counter() - step_start)
        bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:.0f}")
        bar.update(1)
        if state.step % config.log_every == 0 or state.step == max_steps:
            append_metrics(metrics_path, {"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                          "tokens_per_second": tokens_per_second, "flops": state.flops})
        stop_early = False
        if state.step % config.eval_every == 0 or state.step == max_steps:
            validate(model, held_out, pad_id, config.batch_size, precision, state, metrics_path)
            stop_early = config.early_stop and state.evals_since_best >= config.early_stop
        if state.step % config.checkpoint_every == 0 or state.step == max_steps or stop_early:
            state.scaler = scaler.state_dict()
            save_checkpoint(checkpoint_path, model, optimizer, state)
            checkpointed = state.step
        if stop_early:
            print(f"early stop at step {state.step}: {config.early_stop} evaluations without a better validation loss")
            break
    bar.close()

    # 7. The adapter, the loss curve, the summary.
    save_adapter(model, run / "adapter", base_model_name_or_path=config.model)
    plotted = plot_losses(metrics_path, run / "loss.png")
    return summarize(state, run, plotted, tokens_seen, time.perf_counter() - start_time)


def summarize(state: RunState, run: Path, plotted: bool, tokens_seen: int, seconds: float) -> dict:
    """Print what the run did and wrote; return it as a dict."""
    summary = {
        "steps": state.step,
        "seconds": round(seconds, 1),
        "tokens": tokens_seen,
        "flops": state.flops,
        "val_loss_start": state.history.get("0"),
        "val_loss_end": state.history.get(str(state.step)),
        "run": str(run),
        "adapter": str(run / "adapter"),
        "loss_png": str(run / "loss.png") if plotted else None,
    }
    print(f"done: {state.step} steps in {summary['seconds']} s, {tokens_seen:,} tokens this session, "
          f"{format_flops(state.flops)}FLOP of matmuls in all; validation loss {summary['val_loss_start']:.4f} "
          f"at step 0 -> {summary['val_loss_end']:.4f} at step {state.step}")
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
