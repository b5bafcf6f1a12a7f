"""Fine-tune a causal language model with LoRA, in a raw PyTorch loop: no accelerate, no Trainer.

    python -m training.loop                      # LLMTIME forecasting on the embedded SmolLM2
    python -m training.loop --task instruct      # the embedded instruction tasks
    python -m training.loop --help               # every setting, with its default and advice
    python -m training.loop --resume runs/NAME   # continue a run from its last readable checkpoint
    torchrun --standalone --nproc-per-node 2 -m training.loop   # the same run on 2 processes (DDP)

The run reads top to bottom in ``train``, in numbered steps; each piece it calls is a small
function above it. Everything it writes goes to ``runs/<name>/``: ``config.json``,
``metrics.jsonl``, ``checkpoint.safetensors`` (and the one before it, ``checkpoint.previous.safetensors``),
``adapter/`` (peft's format) and ``loss.png``.
Under torchrun every process runs this same code on its share of the data; what differs is
marked where it happens (``world``, ``training/distributed.py``), and rank 0 alone prints and writes.
"""

import contextlib
import functools
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.distributed.elastic.multiprocessing.errors import record
from tqdm import tqdm

from data.collate import PadCollator, length_grouped_batches
from data.sequences import IGNORE_INDEX, pad_token_id
from data.tasks import build_task
from eval.flops import flops_of_model, format_flops
from eval.perplexity import summed_nll
from lora import (adapter_state_dict, cast_frozen, inject_lora, quantize_model, save_adapter, trainable_parameters_line,
                  use_fused_lora)
from lora.loraplus import loraplus_optimizer
from lora.atomic import write_atomically
from models.loader import load_model
from models.loss import label_tokens, summed_token_nll
from models.precision import Precision, choose_precision
from training import distributed
from training.checkpoint import (CHECKPOINT_NAME, RunState, choose_checkpoint, load_checkpoint, previous_checkpoint,
                                 save_checkpoint)
from training.config import TrainConfig, parse_config
from training.distributed import World, gradient_sync, sum_over_ranks
from training.plot import plot_losses
from training.schedule import get_lr


class BadInput(Exception):
    """A model, data file, checkpoint or run folder that cannot work: reported in one line, exit status 2."""


class Diverged(Exception):
    """The loss became NaN or infinite: the run stops, keeping its last good checkpoint."""


@contextlib.contextmanager
def as_bad_input():
    """Errors of loading the model, the data or the checkpoint, raised as ``BadInput``: the input's fault.

    A missing file, a model name that does not exist, targets that match nothing in the model, a
    checkpoint of another adapter: each is found only by loading, and raises ``FileNotFoundError``,
    ``ValueError`` or ``TypeError`` with a message that names the fix, which ``main`` prints in one
    line (exit status 2). Only the setup runs inside, before the loop: every rank loads the same
    things and raises the same error, so all of them meet in ``distributed.stop()``. A ``ValueError``
    once the loop runs is a bug, and keeps its traceback.
    """
    try:
        yield
    except (FileNotFoundError, ValueError, TypeError) as error:
        raise BadInput(str(error)) from None


@dataclass
class Session:
    """What the loop carries from step to step beside ``RunState``: this session's alone, so no checkpoint keeps it."""

    checkpointed: int  # the step of the newest checkpoint, written or resumed from: the one a diverging run keeps
    tokens_seen: int = 0  # tokens trained on since this session started (the summary's count)


def step_plan(lengths: list[int], batch_size: int, grad_accum: int, seed: int, rank: int = 0, world_size: int = 1):
    """``plan(step)``: ``(m, example indices)`` of each of this rank's ``grad_accum`` micro-batches of step ``step``.

    ``m`` counts micro-batches over the whole run and all ranks: rank r of ``world_size`` takes
    ``m = i * world_size + r`` for its i-th micro-batch, so the ranks of one step together take
    the consecutive micro-batches one process with ``grad_accum * world_size`` would. Each epoch
    has its own seeded plan (length-grouped, so instruction batches carry little padding), so
    step s gets the same batches whenever it is asked for: that is what lets a resumed run see
    exactly the batches the uninterrupted run would have.
    """
    per_epoch = math.ceil(len(lengths) / batch_size)

    @functools.lru_cache(maxsize=1)  # one epoch's plan at a time
    def epoch_plan(epoch: int) -> list[list[int]]:
        return length_grouped_batches(lengths, batch_size, seed=seed + epoch)

    def plan(step: int) -> list[tuple[int, list[int]]]:
        mine = [i * world_size + rank for i in range(step * grad_accum, (step + 1) * grad_accum)]
        return [(m, epoch_plan(m // per_epoch)[m % per_epoch]) for m in mine]

    return plan


def total_steps(config: TrainConfig, n_train: int, world_size: int = 1) -> int:
    """``--max-steps``, or with ``--epochs`` the optimizer steps that many passes over the data take (all ranks)."""
    if config.epochs > 0:
        micro_batches = config.epochs * math.ceil(n_train / config.batch_size)
        return max(1, round(micro_batches / (config.grad_accum * world_size)))
    return config.max_steps


def validation_examples(validation: list[dict], n: int) -> list[dict]:
    """``n`` examples spread evenly over the validation set: the same ones at every validation."""
    n = min(len(validation), n)
    return [validation[round(i * (len(validation) - 1) / max(n - 1, 1))] for i in range(n)]


def validation_shard(examples: list[dict], rank: int, world_size: int) -> list[dict]:
    """Rank ``rank``'s share of ``examples`` (every ``world_size``-th), padded to the longest share.

    The padding repeats an example with every label ``-100``: it counts no tokens, but every
    rank runs the same number of forward passes, which FSDP2 needs (each pass gathers the
    layers from all ranks, so a rank with one batch fewer would leave the others waiting).
    """
    shard = examples[rank::world_size]
    blank = {**examples[0], "labels": [IGNORE_INDEX] * len(examples[0]["input_ids"])}
    return shard + [blank] * (math.ceil(len(examples) / world_size) - len(shard))


def flop_counter(model, max_length: int, say=print):
    """``count(batch)``: the matmul FLOPs of one training step on ``batch``, from the model's shape (eval/flops.py)."""
    try:
        flops_of_model(model, max_length)
    except ValueError as error:  # targets the analytic count does not model (not in every layer, say)
        say(f"note: FLOPs are not counted: {error}")
        return lambda batch: 0.0
    per_sequence = functools.cache(lambda length: flops_of_model(model, length).total)
    return lambda batch: batch["input_ids"].shape[0] * per_sequence(batch["input_ids"].shape[1])


def load_model_and_data(config: TrainConfig, precision: Precision, device: torch.device):
    """Step 2: ``(model, tokenizer, data)``, the pretrained model on ``device`` and ``config``'s task.

    The frozen weights are held in the compute dtype (bf16 where the device computes it natively:
    no weight is cast again at each matmul). A base to be held in 4 bits is loaded in fp32, so that
    its block constants are computed from the unrounded weights.

    Raises:
        FileNotFoundError, ValueError: a model or data file that does not load, or data with no examples.
    """
    model, tokenizer = load_model(config.model, precision.base_dtype if config.quantize == "none" else torch.float32)
    data = build_task(config, tokenizer)
    if not data.train or not data.validation:
        raise ValueError(f"no training or validation examples in {config.data or config.task}")
    model.to(device)
    model.config.use_cache = False  # the KV cache is for generation; training recomputes everything
    return model, tokenizer, data


def add_lora(model, config: TrainConfig, precision: Precision) -> tuple[list[str], dict | None]:
    """Step 3: LoRA on ``config``'s targets, everything else frozen; ``(targets, pissa_start)``.

    A and B are made in fp32 (AdamW's small steps would round away in bf16); with ``--quantize
    nf4`` the base is held in 4 bits first, and ``cast_frozen`` holds what else is frozen in the
    compute dtype. ``pissa_start``: with ``--init pissa``, the adapter PiSSA starts from, kept to
    save the trained adapter for the original base (a resumed run takes the same SVD of the same
    weights, so it finds the same start before its checkpoint loads); else None.

    Raises:
        ValueError, TypeError: targets that match nothing in this model, or that LoRA cannot adapt.
    """
    if config.quantize == "nf4":
        quantize_model(model, double_quant=config.double_quant)
    targets = inject_lora(model, config.target_modules, r=config.r, alpha=config.alpha, dropout=config.dropout,
                          adapter_dtype=torch.float32, use_rslora=config.use_rslora, init=config.init,
                          use_dora=config.use_dora)
    pissa_start = {key: tensor.clone() for key, tensor in adapter_state_dict(model).items()} \
        if config.init == "pissa" else None
    cast_frozen(model, precision.base_dtype)  # a 4-bit base: what is not 4-bit; its fp32 constants stay as they are
    use_fused_lora(model, config.lora_path == "fused")
    if config.gradient_checkpointing:
        # Non-reentrant checkpointing recomputes activations without needing the input to
        # require grad, so the gradients of A and B still flow through a frozen base.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return targets, pissa_start


def lora_optimizer(model, config: TrainConfig) -> torch.optim.Optimizer:
    """Step 4: AdamW over A and B only: the frozen base has no gradients and no optimizer state.

    With ``--loraplus-ratio``, B's group carries ``lr_scale`` = ratio (LoRA+, lora/loraplus.py),
    by which the loop multiplies the schedule's learning rate.
    """
    if config.loraplus_ratio:
        return loraplus_optimizer(model, lr=config.lr, ratio=config.loraplus_ratio, weight_decay=config.weight_decay)
    trainable = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)


def step_batches(examples: list[dict], collate: PadCollator, config: TrainConfig, world: World):
    """``batches(step)``: ``(micro_batches, seeds)`` of step ``step``, collated on this rank's device.

    The micro-batches are this rank's share of the step (``step_plan``); each has the seed its
    dropout draws from (``micro_batch_seed``).
    """
    plan = step_plan([len(example["input_ids"]) for example in examples], config.batch_size, config.grad_accum,
                     config.seed, world.rank, world.size)

    def batches(step: int) -> tuple[list[dict], list[int]]:
        planned = plan(step)
        micro_batches = [{key: value.to(world.device) for key, value in collate([examples[i] for i in indices]).items()}
                         for _, indices in planned]
        return micro_batches, [micro_batch_seed(config.seed, m) for m, _ in planned]

    return batches


def micro_batch_seed(seed: int, m: int) -> int:
    """The seed dropout draws from in global micro-batch ``m``: the run's seed above, ``m`` below.

    Seeding by the micro-batch, not by the rank, gives micro-batch m the same dropout masks on
    whichever rank takes it, so N ranks train exactly as one process does, dropout on.
    """
    return (seed << 32) + m


def accumulate_gradients(model, micro_batches: list[dict], precision: Precision, scaler,
                         seeds: list[int] | None = None, world: World = World()) -> float:
    """Forward and backward over this rank's micro-batches of one optimizer step; return the step's loss.

    The loss is the mean over every labelled token of the step, wherever it sits: each micro-batch
    adds its summed token loss divided by the label tokens of the *whole step*, all micro-batches
    of all ranks (an all-reduce counts them). Dividing each micro-batch's own mean by their
    number instead would weigh a micro-batch of 3 answer tokens as much as one of 300 (transformers'
    Trainer passes its loss ``num_items_in_batch`` for the same reason). DDP and FSDP2 then *average* the
    ranks' gradients; dividing by ``tokens / world.size`` instead of ``tokens`` turns their
    average into the sum the mean needs (torchtune does the same). The loss returned is the
    whole step's, the same on every rank.

    ``seeds``: one per micro-batch (``micro_batch_seed``), reseeding the dropout masks before it.
    """
    (n_tokens,) = sum_over_ranks(sum(label_tokens(batch) for batch in micro_batches))
    per_rank_tokens = max(n_tokens, 1) / world.size
    step_loss = 0.0
    for i, batch in enumerate(micro_batches):
        if seeds is not None:
            torch.manual_seed(seeds[i])
        with gradient_sync(model, enabled=i == len(micro_batches) - 1):  # exchange once, after the last
            loss = summed_token_nll(model, batch, precision) / per_rank_tokens
            scaler.scale(loss).backward()  # gradients add up in .grad
        step_loss += loss.item() / world.size
    (step_loss,) = sum_over_ranks(step_loss)
    return step_loss


def optimizer_step(model, optimizer: torch.optim.Optimizer, scaler, max_grad_norm: float, step: int) -> float:
    """Step 6b: clip the gradient norm, step AdamW, clear the gradients; return the norm before clipping.

    ``max_grad_norm`` 0 clips nothing. ``step`` (counted from 1) is named in the error.

    Raises:
        BadInput: under DDP, a trainable parameter got no gradient (``distributed.without_gradient``).
    """
    missing = distributed.without_gradient(model)
    if missing:
        raise BadInput(f"{missing[0]} got no gradient in step {step}: under DDP every trainable "
                       "parameter must take part in every forward (was its adapter disabled?); enable it, or "
                       "leave its module out of --targets")
    scaler.unscale_(optimizer)  # fp16: the gradients divided by the loss scale again, before clipping
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_norm = distributed.clip_grad_norm(trainable, max_grad_norm or math.inf)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def diverged(loss: float, step: int, checkpoint: Path, session: Session) -> Diverged:
    """The error of a loss that became ``loss`` in step ``step``: it names the checkpoint with the last good step."""
    # The newest; or, in a run resumed from the previous one, that one until the next is written.
    last = next((path for path in (checkpoint, previous_checkpoint(checkpoint)) if path.is_file()), None)
    kept = (f"the last good checkpoint, of step {session.checkpointed}, stays in {last}"
            if last else "no checkpoint had been written yet")
    return Diverged(f"the loss is {loss} at step {step}; {kept}; lower --lr and try again")


def due(step: int, every: int, max_steps: int) -> bool:
    """Whether what is done every ``every`` steps (log, validate, checkpoint) is due after step ``step``.

    After the last step everything is due, whatever ``every``: the run ends logged, validated and checkpointed.
    """
    return step % every == 0 or step == max_steps


def validate(model, examples: list[dict], pad_id: int, batch_size: int, precision: Precision, state: RunState,
             world: World = World()) -> float:
    """The validation loss (per token, as training's), recorded in ``state``'s history and best; returned.

    Each rank scores its shard; the summed losses and token counts are added over the ranks,
    so the loss is the one a single process computes on all of ``examples``.
    """
    total, count = summed_nll(model, validation_shard(examples, world.rank, world.size), pad_id, batch_size, precision)
    total, count = sum_over_ranks(total, count)
    loss = total / count
    state.history[str(state.step)] = loss
    state.best, state.evals_since_best = (loss, 0) if loss < state.best else (state.best, state.evals_since_best + 1)
    return loss


def append_metrics(path: Path, entry: dict) -> None:
    with open(path, "a") as file:
        file.write(json.dumps(entry) + "\n")


def run_folder(config: TrainConfig, resume: Path | None) -> tuple[Path, bool]:
    """``(folder, resuming)``: the run's folder, and whether it continues from the checkpoint there.

    Under torchrun the default name is the rendezvous id, the same on every rank and after a
    restart: a worker group that torchrun restarts after a failure finds its own folder and
    resumes from its checkpoint.
    """
    if resume is not None:
        return resume, True
    name = config.name or f"{config.task}-{distributed.run_id() or time.strftime('%Y%m%d-%H%M%S')}"
    run = Path(config.out) / name
    if distributed.restarted():
        newest = run / CHECKPOINT_NAME
        return run, newest.is_file() or previous_checkpoint(newest).is_file()
    if run.exists():
        raise BadInput(f"{run} exists; pick another --name, or continue it with --resume {run}")
    return run, False


def open_run(config: TrainConfig, resume: Path | None, model, optimizer, scaler,
             world: World = World()) -> tuple[Path, RunState]:
    """The run folder and the state to start from: a new folder, or the one being resumed at its checkpoint.

    Rank 0 chooses the folder and, resuming, the checkpoint (the newest, or the one before it
    when the newest is unreadable: ``choose_checkpoint``, which warns in one line), and tells
    the others, so all agree: every rank loads the same file, or all stop with the same error.

    Raises:
        BadInput: rank 0 found no folder or checkpoint to use (its error, on every rank).
        FileNotFoundError, ValueError: the checkpoint chosen does not fit the model (``load_checkpoint``).
    """
    decision = ""
    if world.is_main:
        try:
            run, resuming = run_folder(config, resume)
            checkpoint, warning = choose_checkpoint(run / CHECKPOINT_NAME) if resuming else (None, "")
            decision = json.dumps({"run": str(run), "checkpoint": checkpoint and str(checkpoint)})
            if warning:
                print(warning, file=sys.stderr)
        except (BadInput, FileNotFoundError, ValueError) as error:
            decision = json.dumps({"error": str(error)})
    decision = json.loads(distributed.broadcast_text(decision))
    if "error" in decision:
        raise BadInput(decision["error"])
    run = Path(decision["run"])
    metrics = run / "metrics.jsonl"
    if decision["checkpoint"] is None:
        state = RunState(world_size=world.size)
        if world.is_main:
            metrics.unlink(missing_ok=True)  # a restarted group that had written no checkpoint starts over
    else:
        state = load_checkpoint(Path(decision["checkpoint"]), model, optimizer, world)
        if state.scaler:
            scaler.load_state_dict(state.scaler)
        if state.world_size != world.size and world.is_main:
            print(f"note: the checkpoint's {state.world_size} processes took the steps so far, {world.size} take "
                  "the rest: each step now takes other micro-batches, so the data order differs from a run "
                  "that kept its number of processes")
        state.world_size = world.size
        if world.is_main and metrics.is_file():  # a resumed run logs the steps after its checkpoint again
            kept = [line for line in metrics.read_text().splitlines() if json.loads(line)["step"] <= state.step]
            write_atomically(metrics, lambda temporary: temporary.write_text("".join(line + "\n" for line in kept)))
    if world.is_main:
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.json").write_text(config.to_json())
    return run, state


def describe_run(config: TrainConfig, world: World, precision: Precision, targets: list[str], max_steps: int,
                 run: Path) -> tuple[str, str]:
    """The lines a run opens with: the model and its adapter; the steps, the processes and the folder."""
    variants = (" (rsLoRA: scaling alpha / sqrt(r))" if config.use_rslora else "") + \
        (", DoRA" if config.use_dora else "") + (", PiSSA start" if config.init == "pissa" else "")
    processes = f" on each of {world.size} processes ({config.strategy_for(world)})" if world.distributed else ""
    return (f"model {config.model} on {world.device} ({precision.name}); LoRA r={config.r} alpha={config.alpha}"
            f"{variants} on {len(targets)} modules ({config.targets}), {config.lora_path} path",
            f"{max_steps} steps of {config.grad_accum} x {config.batch_size} sequences{processes}; writing to {run}/")


def train(config: TrainConfig, resume: Path | None = None, world: World | None = None) -> dict:
    """Run the training ``config`` describes (or continue the run in ``resume``); return a summary.

    ``world``: this process's place among torchrun's (``distributed.start()`` by default). Every rank calls
    ``train`` with the same settings, which ``TrainConfig.validate`` checks first for this world (ValueError).

    Raises:
        BadInput: what cannot load, found before the loop (``as_bad_input``); under DDP, a parameter with no gradient.
        Diverged: the loss became NaN or infinite.
    """
    start_time = time.perf_counter()
    world = world or distributed.start()
    config.validate(world)  # a config built in code, too: the same checks as the command line's
    say = print if world.is_main else lambda *args, **kwargs: None

    # 1. Seed everything that draws random numbers: LoRA's A, dropout, the data order. Every rank
    #    uses the same seed, so every rank starts from the same A (FSDP2 does not broadcast it).
    random.seed(config.seed)
    torch.manual_seed(config.seed)

    # 2. The pretrained model, its frozen weights in the compute dtype (bf16 where the device computes it
    #    natively), and the data. What steps 2 to 5 cannot load stops every rank alike, in one line.
    precision = choose_precision(config.precision, world.device)
    with as_bad_input():
        model, tokenizer, data = load_model_and_data(config, precision, world.device)
        # 3. LoRA on the targets, A and B in fp32; then the model spread over the processes.
        targets, pissa_start = add_lora(model, config, precision)
        count_flops = flop_counter(model, config.max_length, say)
        parameters_line = trainable_parameters_line(model)  # before FSDP2 shards the parameters: their sizes are whole
        model = distributed.wrap_model(model, config.strategy_for(world), world, config.fsdp_bf16)
        # 4. AdamW over A and B only; fp16 alone needs its loss scaled (for bf16 and fp32 the scaler
        #    is off and passes values through). Then which examples each step takes.
        optimizer = lora_optimizer(model, config)
        scaler = torch.amp.GradScaler(world.device.type, enabled=precision.needs_loss_scaling)
        pad_id = pad_token_id(tokenizer)
        batches = step_batches(data.train, PadCollator(pad_id), config, world)
        max_steps = total_steps(config, len(data.train), world.size)
        held_out = validation_examples(data.validation, config.eval_batches * config.batch_size)
        # 5. The run folder and the state to start from (step 0, or the resumed checkpoint's).
        run, state = open_run(config, resume, model, optimizer, scaler, world)
    # What the loop carries and where it logs; the lines a run opens with; the validation loss at step 0.
    session, checkpoint = Session(checkpointed=state.step), run / CHECKPOINT_NAME
    evaluate = functools.partial(validate, model, held_out, pad_id, config.batch_size, precision, world=world)
    log = functools.partial(append_metrics, run / "metrics.jsonl") if world.is_main else lambda entry: None
    opening, steps = describe_run(config, world, precision, targets, max_steps, run)
    say(f"{opening}\n{parameters_line}\n{data.description}\n{steps}")
    if state.step == 0:
        log({"step": 0, "val_loss": evaluate(state)})

    # 6. The loop: one optimizer step per iteration (an error closes the bar before it is printed).
    with tqdm(total=max_steps, initial=state.step, desc="training", dynamic_ncols=True,
              disable=not world.is_main) as bar:
        while state.step < max_steps:
            step_start = time.perf_counter()
            lr = get_lr(state.step, config.lr, config.min_lr, config.warmup_steps, max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)  # LoRA+'s B: the same schedule, ratio times higher

            # 6a. Forward and backward over the step's micro-batches, every label token weighing the same.
            micro_batches, seeds = batches(state.step)
            loss = accumulate_gradients(model, micro_batches, precision, scaler, seeds, world)
            if not math.isfinite(loss):  # the same all-reduced loss on every rank: all stop together
                raise diverged(loss, state.step + 1, checkpoint, session)

            # 6b. Clip the gradient norm, step AdamW, clear the gradients; count what the step did.
            grad_norm = optimizer_step(model, optimizer, scaler, config.max_grad_norm, state.step + 1)
            state.step += 1
            tokens, flops = sum_over_ranks(sum(int(batch["attention_mask"].sum()) for batch in micro_batches),
                                           sum(count_flops(batch) for batch in micro_batches))
            state.flops += flops
            session.tokens_seen += int(tokens)

            # 6c. Log, validate, checkpoint (every rank validates and checkpoints: both are collectives).
            tokens_per_second = tokens / (time.perf_counter() - step_start)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_second:.0f}")
            bar.update(1)
            if due(state.step, config.log_every, max_steps):
                log({"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_second": tokens_per_second, "flops": state.flops})
            stop_early = False
            if due(state.step, config.eval_every, max_steps):
                log({"step": state.step, "val_loss": evaluate(state)})
                stop_early = config.early_stop and state.evals_since_best >= config.early_stop  # the same on every rank
            if due(state.step, config.checkpoint_every, max_steps) or stop_early:
                state.scaler = scaler.state_dict()
                save_checkpoint(checkpoint, model, optimizer, state, world)
                session.checkpointed = state.step
            if stop_early:
                say(f"early stop at step {state.step}: {config.early_stop} evaluations without a better "
                    "validation loss")
                break

    # 7. The adapter (gathered whole: a collective), the loss curve, the summary: rank 0 writes.
    tensors = distributed.adapter_tensors(model)
    if world.is_main:
        save_adapter(distributed.unwrap(model), run / "adapter", base_model_name_or_path=config.model, tensors=tensors,
                     initial=pissa_start)
    plotted = world.is_main and plot_losses(run / "metrics.jsonl", run / "loss.png")
    distributed.barrier()
    return summarize(state, run, plotted, session.tokens_seen, time.perf_counter() - start_time, say)


def summarize(state: RunState, run: Path, plotted: bool, tokens_seen: int, seconds: float, say=print) -> dict:
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
    say(f"done: {state.step} steps in {summary['seconds']} s, {tokens_seen:,} tokens this session, "
        f"{format_flops(state.flops)}FLOP of matmuls in all; validation loss {summary['val_loss_start']:.4f} "
        f"at step 0 -> {summary['val_loss_end']:.4f} at step {state.step}")
    say(f"saved: {run}/adapter (peft format), {run}/metrics.jsonl, {run}/checkpoint.safetensors"
        + (f", {run}/loss.png" if plotted else ""))
    return summary


@record  # under torchrun, a rank that fails leaves its traceback in the error file torchrun reports
def main(argv=None) -> int:
    """``python -m training.loop``: exit status 0 when the run ends, 2 for bad input, 1 when the loss diverged.

    Bad input is one line, ``error: ...``: a setting that cannot work here (``TrainConfig.validate``),
    or a model, data file or checkpoint that does not load (``BadInput``, from ``train``'s setup).
    """
    world = distributed.start()
    say_error = (lambda text: print(text, file=sys.stderr)) if world.is_main else (lambda text: None)
    try:
        config, resume = parse_config(argv, world)
    except ValueError as error:  # a setting that cannot work on this machine; nothing has been written
        say_error(f"error: {error}")
        distributed.stop()
        return 2
    try:
        train(config, resume, world)
        code = 0
    except BadInput as error:
        say_error(f"error: {error}")
        code = 2
    except Diverged as error:
        say_error(f"stopped: {error}")
        code = 1
    # Reached only when every rank got here (these errors are agreed on); any other exception
    # ends this rank at once, and torchrun stops the others.
    distributed.stop()
    return code


if __name__ == "__main__":
    sys.exit(main())
