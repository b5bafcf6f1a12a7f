"""The training run's settings: one dataclass, with a line of advice on every default.

The command line is generated from the dataclass, so ``python -m training.loop --help`` lists
every field with its default, and nothing can be set in one place and missed in the other.
``--config run.json`` loads settings from a file (a run's own ``config.json`` works); flags
given next to it override the file.
"""

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from data.lotka_volterra import check_noise
from data.tasks import TASKS
from lora.inject import INITS
from lora.targets import parse_targets
from lora.layer import check_hyperparameters
from models.precision import PRECISIONS, choose_precision
from training.distributed import STRATEGIES, World

LORA_PATHS = ("plain", "fused")
QUANTIZATIONS = ("none", "nf4")


def option(default, advice: str):
    """A dataclass field whose ``advice`` becomes its ``--help`` text."""
    return field(default=default, metadata={"help": advice})


@dataclass
class TrainConfig:
    # What to train.
    model: str = option("smollm2-135m-instruct", "model name (smollm2-135m-instruct, tiny-qwen2, tiny-llama), "
                        "Hugging Face id or local folder; nothing is downloaded")
    task: str = option("llmtime", "llmtime: forecast predator-prey series; instruct: follow instructions")
    data: str | None = option(None, "llmtime: a .npz from save_dataset; instruct: Alpaca .json or .jsonl; "
                              "default: simulated series / the embedded generated tasks")
    noise: float = option(0.0, "llmtime: observe the simulated series with multiplicative log-normal noise "
                          "(0.05: about 5 percent), training and validation alike; 0: the equations' clean solutions")
    # The adapter.
    targets: str = option("q_proj,v_proj", "comma-separated module names to adapt; q and v are the LoRA paper's "
                          "choice for a small budget")
    r: int = option(8, "rank of B·A; 8 is plenty for one narrow task, raise it only if the loss plateaus high")
    alpha: float = option(16.0, "scaling is alpha / r; the LoRA paper keeps alpha fixed while it varies r, which "
                          "reduces the need to retune (§4.1); with Adam, tuning alpha is roughly tuning lr")
    dropout: float = option(0.0, "dropout on the LoRA path; 0.05 to 0.1 helps against overfitting small data")
    use_rslora: bool = option(False, "scale by alpha / sqrt(r) instead of alpha / r (rsLoRA): a larger r then "
                              "starts with updates as large as a small r's, and can use its extra rank")
    use_dora: bool = option(False, "DoRA (lora/dora.py): a trained magnitude per output beside the low-rank "
                            "direction; a little more time and memory a step than plain LoRA")
    init: str = option("lora", "lora: A random, B zero (training starts at the pretrained model); pissa: A and B "
                       "from W's top-r singular vectors, the rest of W frozen (PiSSA); the adapter is saved "
                       "for the original base either way")
    lora_path: str = option("plain", "plain: the LoRA layer's one-line formula, peft's ops op for op; fused: the "
                            "same math with a hand-written backward (lora/fused.py), a few percent faster a step")
    quantize: str = option("none", "nf4: hold the frozen base in 4 bits (QLoRA, lora/nf4.py), every Linear but "
                           "lm_head; none: as loaded")
    double_quant: bool = option(False, "with --quantize nf4, quantize the absmax constants too: about 4.127 bits "
                                "a weight instead of 4.5")
    # The optimisation.
    lr: float = option(1e-3, "peak learning rate; LoRA tolerates ~10x the rate of full fine-tuning")
    min_lr: float = option(1e-4, "learning rate at the end of the cosine decay; about a tenth of lr")
    warmup_steps: int = option(10, "linear warm-up from 0; a few percent of the steps avoids an early blow-up")
    loraplus_ratio: float = option(0.0, "LoRA+ (lora/loraplus.py): B trains at this times lr, A at lr; the "
                                   "paper's rule of thumb is 16; 0 is off, one lr for both")
    weight_decay: float = option(0.0, "AdamW weight decay on A and B; 0 is usual for LoRA")
    max_grad_norm: float = option(1.0, "clip the gradient norm to this; 0 turns clipping off")
    batch_size: int = option(2, "sequences per micro-batch; memory grows with batch_size x max_length")
    grad_accum: int = option(1, "micro-batches per optimizer step; raises the effective batch at no memory cost")
    max_steps: int = option(150, "optimizer steps; about 4 s each for the default model on 2 CPU cores")
    epochs: float = option(0.0, "if > 0, train this many passes over the data instead of max_steps")
    max_length: int = option(512, "tokens per training window; the model's context while training")
    stride: int = option(256, "tokens between window starts; max_length - stride tokens overlap")
    # Watching, saving, repeating.
    eval_every: int = option(50, "validate every this many steps (and at step 0 and the end)")
    eval_batches: int = option(8, "validation micro-batches per evaluation, the same ones every time")
    early_stop: int = option(0, "stop after this many evaluations without a new best; 0 never stops early")
    checkpoint_every: int = option(50, "write a resumable checkpoint every this many steps")
    log_every: int = option(1, "append to metrics.jsonl every this many steps")
    precision: str = option("auto", "auto: bf16 autocast where the device supports it (fp16 + scaler on older "
                            "GPUs), else fp32")
    gradient_checkpointing: bool = option(False, "recompute activations in the backward pass: less memory, "
                                          "about a third more time")
    # Several processes (under torchrun; one process ignores these).
    strategy: str = option("auto", "auto: ddp when torchrun starts several processes; ddp: a whole model per process, "
                           "only LoRA's gradients exchanged; fsdp2: the base sharded over the processes, for a model "
                           "too big for one device (it moves the whole base twice a step)")
    fsdp_bf16: bool = option(False, "with --strategy fsdp2: gather parameters in bf16 (half the bytes) and reduce "
                             "gradients in fp32")
    seed: int = option(0, "seeds data order, initialisation and dropout: same seed and settings, same losses")
    out: str = option("runs", "folder that holds one subfolder per run")
    name: str | None = option(None, "run folder name; default: <task>-<date>-<time>")

    def validate(self, world: World | None = None) -> None:
        """Raise ``ValueError`` naming the first field whose value cannot work.

        Given ``world`` (the processes and the device the run will have), also the settings that
        cannot work there: ``--precision fp16`` without a CUDA GPU, and fp16 (asked for, or what
        ``auto`` picks on an older GPU) under FSDP2.
        """
        try:
            check_hyperparameters(self.r, self.alpha, self.dropout)  # LoRA's own checks: lora/layer.py
            check_noise(self.noise)  # the simulator's own check: data/lotka_volterra.py
        except ValueError as error:
            raise ValueError(f"--{error}") from None
        positive = ("batch_size", "grad_accum", "max_steps", "eval_every", "eval_batches", "checkpoint_every",
                    "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        checks = [
            (self.task in TASKS, f"--task must be one of {', '.join(TASKS)}, got {self.task!r}"),
            (self.noise == 0 or (self.task == "llmtime" and self.data is None),
             "--noise applies to the llmtime task's simulated series only (not to --task instruct or --data)"),
            (self.quantize in QUANTIZATIONS,
             f"--quantize must be one of {', '.join(QUANTIZATIONS)}, got {self.quantize!r}"),
            (not self.double_quant or self.quantize == "nf4", "--double-quant needs --quantize nf4"),
            (self.init in INITS, f"--init must be one of {', '.join(INITS)}, got {self.init!r}"),
            (not self.use_dora or self.quantize == "none", "--use-dora needs the base in full precision for its "
             "row norms; a 4-bit base (--quantize nf4, QDoRA) is not supported"),
            (not self.use_dora or self.lora_path == "plain", "--use-dora takes the plain path; the fused one "
             "(--lora-path fused) is plain LoRA's only"),
            (self.init != "pissa" or self.quantize == "none", "--init pissa takes the SVD of full-precision "
             "weights, which --quantize nf4 has already rounded to 4 bits; use one or the other"),
            (self.lora_path in LORA_PATHS,
             f"--lora-path must be one of {', '.join(LORA_PATHS)}, got {self.lora_path!r}"),
            (self.precision in PRECISIONS,
             f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}"),
            (self.strategy in STRATEGIES,
             f"--strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}"),
            (not self.fsdp_bf16 or self.strategy == "fsdp2", "--fsdp-bf16 needs --strategy fsdp2"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0 <= self.min_lr <= self.lr, f"--min-lr must be in [0, lr={self.lr}], got {self.min_lr}"),
            (self.warmup_steps >= 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.loraplus_ratio == 0 or 0 < self.loraplus_ratio < math.inf,
             f"--loraplus-ratio must be 0 (off) or a number > 0, got {self.loraplus_ratio}"),
            (self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}"),
            (self.epochs >= 0, f"--epochs must be >= 0, got {self.epochs}"),
            (self.max_length >= 2, f"--max-length must be at least 2, got {self.max_length}"),
            (1 <= self.stride <= self.max_length, f"--stride must be in [1, max_length={self.max_length}], "
                                                  f"got {self.stride}"),
            (self.early_stop >= 0, f"--early-stop must be >= 0, got {self.early_stop}"),
            (bool(self.target_modules), "--targets must name at least one module"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        if world is None:
            return
        precision = choose_precision(self.precision, world.device)  # raises for fp16 without CUDA
        if self.strategy_for(world) == "fsdp2" and precision.needs_loss_scaling:
            raise ValueError("--precision fp16 needs a gradient scaler, which this loop does not combine with "
                             "FSDP2's sharded gradients; use --precision bf16, or --strategy ddp")

    def strategy_for(self, world: World) -> str:
        """How ``world``'s processes share the run: "none" alone; under torchrun ``--strategy``, auto being ddp."""
        if not world.distributed:
            return "none"
        return "ddp" if self.strategy == "auto" else self.strategy

    @property
    def target_modules(self) -> list[str]:
        return parse_targets(self.targets)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"


class OneLineParser(argparse.ArgumentParser):
    """argparse, but an error is one line (no usage block) and exits with status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def build_parser(prog: str = "python -m training.loop") -> argparse.ArgumentParser:
    """One ``--flag`` per ``TrainConfig`` field (underscores become dashes), plus ``--config`` and ``--resume``."""
    parser = OneLineParser(prog=prog, description="Fine-tune a causal LM with LoRA, in plain PyTorch.",
                           formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--config", type=Path, help="a JSON file of settings; flags override it")
    parser.add_argument("--resume", type=Path, help="a run folder to continue from its last checkpoint")
    for spec in fields(TrainConfig):
        flag = "--" + spec.name.replace("_", "-")
        kind = {int: int, float: float, bool: _parse_bool}.get(spec.type, str)
        # SUPPRESS: only flags actually given override --config; the defaults come from the dataclass.
        switch = dict(nargs="?", const=True) if spec.type is bool else {}  # a bare --flag means true
        parser.add_argument(flag, type=kind, default=argparse.SUPPRESS, metavar=spec.name.upper(), **switch,
                            help=f"{spec.metadata['help']} (default: {spec.default})")
    return parser


def config_from_file(path: Path) -> dict:
    """The settings in a JSON file; errors name the file and the line or field."""
    try:
        values = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: no such config file") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}: line {error.lineno}: not valid JSON ({error.msg})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a JSON object of settings")
    known = {spec.name for spec in fields(TrainConfig)}
    for key in values:
        if key not in known:
            raise ValueError(f"{path}: unknown setting {key!r}; see python -m training.loop --help")
    return values


def parse_config(argv=None, world: World | None = None) -> tuple[TrainConfig, Path | None]:
    """``(config, resume_folder)`` from the command line; bad input raises ``ValueError`` naming the field.

    With ``--resume runs/NAME`` the run's own ``config.json`` is the base, so the run continues
    with the settings it started with; flags may still change some (``--max-steps``, say).
    ``world``: the processes and device the run will have, to check the settings against
    (``TrainConfig.validate``); ``python -m training.loop`` passes its own.
    """
    args = vars(build_parser().parse_args(sys.argv[1:] if argv is None else argv))
    config_path, resume = args.pop("config"), args.pop("resume")
    values = {}
    if resume is not None:
        config_path = config_path or resume / "config.json"
        if not (resume / "config.json").is_file():
            raise ValueError(f"{resume}: not a run folder (no config.json); --resume takes runs/<name>")
    if config_path is not None:
        values.update(config_from_file(config_path))
    values.update(args)
    config = TrainConfig(**values)
    for spec in fields(TrainConfig):  # a config file can hold any JSON type; flags are typed by argparse
        value = getattr(config, spec.name)
        accepted = {int: (int,), float: (int, float), bool: (bool,)}.get(spec.type, (str, type(None)))
        if not isinstance(value, accepted) or (isinstance(value, bool) and spec.type is not bool):
            raise ValueError(f"setting {spec.name!r} must be {getattr(spec.type, '__name__', 'a string')}, "
                             f"got {value!r}")
    config.validate(world)
    return config, resume
