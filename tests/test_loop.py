"""The training loop on tiny models: schedule, settings, run folder, determinism, resume after SIGKILL, bad input."""

import copy
import dataclasses
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import randomize_lora, token_batch
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from data.collate import PadCollator
from lora import cast_frozen, inject_lora, load_adapter, lora_layers
from lora.atomic import write_atomically
from models.loader import char_tokenizer, load_model, tiny_model
from models.precision import Precision, choose_precision, cpu_supports_bf16
from training import loop
from training.checkpoint import (RunState, choose_checkpoint, load_checkpoint, previous_checkpoint, read_checkpoint,
                                 save_checkpoint)
from training.config import TrainConfig, build_parser, parse_config
from training.loop import main, train
from training.schedule import get_lr

ROOT = Path(__file__).parent.parent
# Small and quick: windows of 64 tokens of the tiny Llama, a few steps.
TINY = ["--model", "tiny-llama", "--max-length", "64", "--stride", "32", "--batch-size", "4",
        "--eval-batches", "2", "--precision", "fp32"]


def run_args(tmp_path, *extra, name="run"):
    return [*TINY, "--out", str(tmp_path), "--name", name, *extra]


def metrics(run: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record[key] for record in records if key in record}


# One tiny run, 4 steps validated and checkpointed every 2, serves the tests that only read what a run
# writes: its files, its plot, its checkpoint's format, its FLOPs and its config.json.
PLAIN = ("--max-steps", "4", "--eval-every", "2", "--checkpoint-every", "2")


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory) -> Path:
    """The folder of one run with ``PLAIN``'s settings; the tests that take it must not change it."""
    out = tmp_path_factory.mktemp("plain")
    assert main(run_args(out, *PLAIN)) == 0
    return out / "run"


# --- The schedule ------------------------------------------------------------------------------------------------


def test_lr_warms_up_linearly_to_the_peak():
    lrs = [get_lr(step, 1e-3, 1e-4, warmup_steps=4, max_steps=20) for step in range(5)]
    assert_close(torch.tensor(lrs), torch.tensor([1e-3 * (s + 1) / 5 for s in range(4)] + [1e-3]), rtol=1e-12, atol=0)


def test_lr_decays_along_a_cosine_to_min_lr():
    lr, min_lr, warmup, steps = 1e-3, 1e-4, 4, 24
    for step in range(warmup, steps):
        progress = (step - warmup) / (steps - 1 - warmup)
        expected = min_lr + (lr - min_lr) * (1 + math.cos(math.pi * progress)) / 2
        assert math.isclose(get_lr(step, lr, min_lr, warmup, steps), expected, rel_tol=1e-12)
    assert get_lr(steps - 1, lr, min_lr, warmup, steps) == pytest.approx(min_lr, rel=1e-12)


# --- Settings ----------------------------------------------------------------------------------------------------


def test_help_lists_every_setting_with_its_default(monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a help text
    options = re.split(r"\n  (?=--)", build_parser().format_help())  # one chunk per option
    for field, value in vars(TrainConfig()).items():
        flag = "--" + field.replace("_", "-")
        (option,) = [chunk for chunk in options if chunk.startswith(flag + " ")]
        assert f"(default: {value})" in option, field


def test_config_file_loads_and_flags_override_it(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"r": 4, "lr": 3e-4, "task": "instruct"}))
    config, _ = parse_config(["--config", str(path), "--lr", "5e-4"])
    assert (config.r, config.lr, config.task) == (4, 5e-4, "instruct")


def test_a_runs_config_json_repeats_the_run(plain_run):
    config, _ = parse_config(["--config", str(plain_run / "config.json")])
    assert config == parse_config(run_args(plain_run.parent, *PLAIN))[0]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--max-length", "1"], "--max-length must be at least 2, got 1"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--lr", "0"], "--lr must be > 0, got 0.0"),
        (["--lr=-1e-3"], "--lr must be > 0, got -0.001"),
        (["--stride", "600"], r"--stride must be in \[1, max_length=512\]"),
        (["--task", "translate"], "--task must be one of llmtime, instruct"),
        (["--lora-path", "fast"], "--lora-path must be one of plain, fused, got 'fast'"),
        (["--r", "0"], r"--r must be a positive integer \(the rank of B @ A\), got 0"),
        (["--alpha", "0"], r"--alpha must be a finite number > 0 \(scaling = alpha / r\), got 0.0"),
        (["--dropout", "1"], r"--dropout must be a number in \[0, 1\), got 1.0"),
        (["--quantize", "int8"], "--quantize must be one of none, nf4, got 'int8'"),
        (["--double-quant"], "--double-quant needs --quantize nf4"),
        (["--noise=-0.1"], r"--noise must be a finite number >= 0 \(0.05: about 5% observation noise\), got -0.1"),
        (["--noise", "0.05", "--task", "instruct"], "--noise applies to the llmtime task's simulated series only"),
    ],
)
def test_bad_setting_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    assert main([*argv, "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err)
    assert list(tmp_path.iterdir()) == []


def test_unknown_flag_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as exit:
        parse_config(["--learning-rate", "1e-3"])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unrecognized arguments: --learning-rate" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "no-such-model"], "no-such-model: not a model folder"),
        (["--data", "missing.npz"], "missing.npz: no such data file"),
        (["--task", "instruct", "--data", "missing.jsonl"], "missing.jsonl: no such data file"),
    ],
)
def test_bad_model_or_data_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys, argv, message):
    assert main([*run_args(tmp_path), *argv]) == 2  # the last --model given wins
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_data_file_of_the_wrong_task_is_one_line_exit_2(tmp_path, capsys):
    wrong = tmp_path / "tasks.jsonl"
    wrong.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    assert main(run_args(tmp_path / "runs", "--data", str(wrong))) == 2
    assert "tasks.jsonl: not a readable .npz file; series data is the .npz" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_resuming_a_run_without_a_checkpoint_is_one_line_exit_2(tmp_path, capsys):
    assert main(run_args(tmp_path, "--max-steps", "2", "--checkpoint-every", "5")) == 0
    (tmp_path / "run" / "checkpoint.safetensors").unlink()
    assert main(["--resume", str(tmp_path / "run")]) == 2
    assert "checkpoint.safetensors: no checkpoint to resume from" in capsys.readouterr().err


def test_existing_run_folder_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    assert main(run_args(tmp_path, "--max-steps", "1")) == 2
    assert "exists; pick another --name, or continue it with --resume" in capsys.readouterr().err


# --- What a run does and writes ----------------------------------------------------------------------------------


def test_run_writes_config_metrics_adapter_checkpoint_and_plot(plain_run):
    run = plain_run
    assert {path.name for path in run.iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.safetensors",
                                                       "adapter"}
    assert sorted(metrics(run, "loss")) == [1, 2, 3, 4]
    assert sorted(metrics(run, "val_loss")) == [0, 2, 4]
    model = tiny_model("tiny-llama")
    load_adapter(model, run / "adapter")
    assert len(list(lora_layers(model))) == 4


def test_loss_curve_is_drawn_when_matplotlib_is_there(plain_run):
    pytest.importorskip("matplotlib")
    assert (plain_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_validation_loss_falls_on_the_tiny_model(tmp_path):
    config, _ = parse_config(run_args(tmp_path, "--max-steps", "30", "--eval-every", "30", "--lr", "3e-3"))
    summary = train(config)
    assert summary["val_loss_end"] < summary["val_loss_start"]


def test_same_seed_and_settings_give_the_same_losses(tmp_path):
    args = ("--max-steps", "5", "--eval-every", "5", "--dropout", "0.1")
    for name in ("a", "b"):
        assert main(run_args(tmp_path, *args, name=name)) == 0
    assert metrics(tmp_path / "a", "loss") == metrics(tmp_path / "b", "loss")
    assert main(run_args(tmp_path, *args, "--seed", "1", name="c")) == 0
    assert metrics(tmp_path / "c", "loss") != metrics(tmp_path / "a", "loss")


def test_a_bare_boolean_flag_means_true():
    config, _ = parse_config(["--quantize", "nf4", "--double-quant"])
    assert config.double_quant is True
    assert parse_config(["--double-quant", "false"])[0].double_quant is False


def test_4bit_base_with_double_quant_trains_with_falling_loss(tmp_path):
    args = ("--max-steps", "30", "--eval-every", "30", "--lr", "3e-3", "--quantize", "nf4", "--double-quant")
    config, _ = parse_config(run_args(tmp_path, *args))
    summary = train(config)
    assert summary["val_loss_end"] < summary["val_loss_start"]


def test_fused_and_plain_lora_paths_give_the_same_losses(tmp_path):
    # The same math in a different order (lora/fused.py): float32 rounding apart, with dropout too. The
    # two paths draw their dropout masks from the same seed (nn.Dropout and torch.native_dropout use the
    # generator alike on the CPU); tests/test_fused.py checks the masks themselves without relying on it.
    args = ("--max-steps", "5", "--eval-every", "5", "--dropout", "0.1")
    for path in ("fused", "plain"):
        assert main(run_args(tmp_path, *args, "--lora-path", path, name=path)) == 0
    fused, plain = (metrics(tmp_path / path, "loss") for path in ("fused", "plain"))
    assert fused.keys() == plain.keys()
    assert_close(torch.tensor(list(fused.values())), torch.tensor(list(plain.values())), rtol=1e-5, atol=0)


def test_instruct_task_trains_on_a_jsonl_file(tmp_path):
    from data.generated_tasks import generate_tasks
    from data.instructions import save_instructions

    data = save_instructions(generate_tasks(200, seed=3), tmp_path / "tasks.jsonl")
    assert main(run_args(tmp_path, "--task", "instruct", "--data", str(data), "--max-steps", "3",
                         "--max-length", "128")) == 0
    assert sorted(metrics(tmp_path / "run", "loss")) == [1, 2, 3]


def instruction_like(length: int, answer: int, seed: int) -> dict:
    """A tokenized example of ``length`` random tokens whose last ``answer`` are labelled (a masked prompt before)."""
    ids = torch.randint(3, 128, (length,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"input_ids": ids, "attention_mask": [1] * length, "labels": [-100] * (length - answer) + ids[-answer:]}


def lora_gradients(model) -> list[torch.Tensor]:
    grads = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return grads


def test_accumulated_step_weighs_every_label_token_the_same():
    # Micro-batches of 60 and of 3 label tokens: accumulated, they must give the gradient of one
    # batch holding all four examples, the mean over its 63 label tokens. Averaging each
    # micro-batch's own mean (the old way, and transformers' before 2024) weighs the 3 tokens as much as the 60.
    model = tiny_model("tiny-llama")
    inject_lora(model)
    randomize_lora(model)
    collate, fp32, off = PadCollator(0), Precision(None), torch.amp.GradScaler("cpu", enabled=False)
    examples = [instruction_like(61, 60, seed=0), instruction_like(20, 1, 1), instruction_like(35, 1, 2),
                instruction_like(12, 1, 3)]
    whole = loop.accumulate_gradients(model, [collate(examples)], fp32, off)
    expected = lora_gradients(model)
    accumulated = loop.accumulate_gradients(model, [collate(examples[:1]), collate(examples[1:])], fp32, off)
    assert_close(accumulated, whole, rtol=1e-6, atol=0)
    for grad, reference in zip(lora_gradients(model), expected):
        assert_close(grad, reference, rtol=1e-5, atol=1e-7)


def test_one_micro_batch_loss_is_the_models_own_loss():
    # The count of label tokens is taken after the shift: an off-by-one there would miss this.
    model = tiny_model("tiny-llama")
    inject_lora(model)
    randomize_lora(model)
    batch = PadCollator(0)([instruction_like(40, 7, seed=0), instruction_like(25, 25, seed=1)])
    loss = loop.accumulate_gradients(model, [batch], Precision(None), torch.amp.GradScaler("cpu", enabled=False))
    with torch.no_grad():
        assert_close(torch.tensor(loss), model(**batch).loss, rtol=1e-6, atol=0)


def test_bf16_base_step_equals_the_fp32_base_autocast_step_within_bf16_tolerance():
    # The old way: an fp32 base, autocast casting each weight to bf16 at each matmul. The new:
    # the frozen base held in bf16, A and B in fp32. The matmuls see the same bf16 weights; what
    # differs is only where the activations between them are rounded.
    fp32_base = tiny_model("tiny-llama")
    inject_lora(fp32_base)
    randomize_lora(fp32_base)
    bf16_base = copy.deepcopy(fp32_base)
    cast_frozen(bf16_base, torch.bfloat16)
    batch = PadCollator(0)([instruction_like(40, 30, seed=0), instruction_like(25, 25, seed=1)])
    bf16, off = Precision(torch.bfloat16), torch.amp.GradScaler("cpu", enabled=False)
    losses = [loop.accumulate_gradients(model, [batch], bf16, off) for model in (fp32_base, bf16_base)]
    assert_close(losses[1], losses[0], rtol=1.6e-2, atol=0)
    grads_fp32, grads_bf16 = lora_gradients(fp32_base), lora_gradients(bf16_base)
    assert {grad.dtype for grad in grads_bf16} == {torch.float32}  # the adapter and its gradients stay fp32
    scale = max(grad.abs().max() for grad in grads_fp32)
    for grad, reference in zip(grads_bf16, grads_fp32):
        assert_close(grad, reference, rtol=1.6e-2, atol=1.6e-2 * scale)


def test_run_in_bf16_holds_the_base_in_bf16_and_saves_an_fp32_adapter(tmp_path, monkeypatch):
    held = {}
    original = loop.load_model

    def spy(name, dtype=torch.float32):
        held["dtype"] = dtype
        return original(name, dtype)

    monkeypatch.setattr(loop, "load_model", spy)
    argv = [arg if arg != "fp32" else "bf16" for arg in run_args(tmp_path, "--max-steps", "2")]
    assert main(argv) == 0
    assert held["dtype"] == torch.bfloat16
    tensors = load_file(tmp_path / "run" / "adapter" / "adapter_model.safetensors")
    assert {tensor.dtype for tensor in tensors.values()} == {torch.float32}


def test_gradient_checkpointing_keeps_lora_gradients(tiny):
    inject_lora(tiny)
    randomize_lora(tiny)
    tiny.train()
    ids = token_batch(tiny)
    tiny(ids, labels=ids).loss.backward()
    expected = [p.grad.clone() for p in tiny.parameters() if p.requires_grad]
    tiny.zero_grad()
    tiny.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    tiny(ids, labels=ids).loss.backward()
    for grad, p in zip(expected, (p for p in tiny.parameters() if p.requires_grad)):
        assert p.grad is not None
        assert_close(p.grad, grad)


def test_run_with_gradient_checkpointing_trains(tmp_path):
    assert main(run_args(tmp_path, "--max-steps", "2", "--gradient-checkpointing", "true")) == 0
    assert len(metrics(tmp_path / "run", "loss")) == 2


# --- Checkpoints, resume, divergence ------------------------------------------------------------------------------


def test_checkpoint_restores_weights_optimizer_and_random_state(tmp_path):
    model = tiny_model("tiny-llama")
    inject_lora(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = token_batch(model)
    model(ids, labels=ids).loss.backward()
    optimizer.step()
    save_checkpoint(tmp_path / "c.safetensors", model, optimizer, RunState(step=7, best=1.5, history={"0": 2.0}))
    expected_draw = torch.rand(3)
    weights = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    moments = {k: v.clone() for k, v in optimizer.state_dict()["state"][0].items()}

    fresh = tiny_model("tiny-llama")
    inject_lora(fresh)
    fresh_optimizer = torch.optim.AdamW([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    torch.manual_seed(99)
    state = load_checkpoint(tmp_path / "c.safetensors", fresh, fresh_optimizer)
    assert state == RunState(step=7, best=1.5, history={"0": 2.0})
    assert_close(torch.rand(3), expected_draw, rtol=0, atol=0)
    for name, p in fresh.named_parameters():
        if p.requires_grad:
            assert_close(p, weights[name], rtol=0, atol=0)
    for key, value in fresh_optimizer.state_dict()["state"][0].items():
        assert_close(value, moments[key], rtol=0, atol=0)


def test_checkpoint_is_safetensors_with_no_pickle(plain_run):
    tensors = load_file(plain_run / "checkpoint.safetensors")  # raises on anything but safetensors
    assert any(key.endswith("lora_A.weight") for key in tensors)
    assert any(key.startswith("optimizer.") for key in tensors)


def test_run_killed_with_sigkill_and_resumed_ends_with_the_same_adapter(tmp_path):
    # Killed right after its first checkpoint (step 20), the run has 40 steps left to resume.
    settings = ("--max-steps", "60", "--eval-every", "20", "--checkpoint-every", "20", "--dropout", "0.1",
                "--log-every", "10")
    assert main(run_args(tmp_path, *settings, name="straight")) == 0

    command = [sys.executable, "-m", "training.loop", *run_args(tmp_path, *settings, name="killed")]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoint.safetensors"
    deadline = time.monotonic() + 120
    while not checkpoint.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    assert not (tmp_path / "killed" / "adapter").exists(), "the run finished before it was killed"

    assert main(["--resume", str(tmp_path / "killed")]) == 0
    straight = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert_close(resumed[key], straight[key])
    assert metrics(tmp_path / "killed", "loss") == metrics(tmp_path / "straight", "loss")


def step_of(path: Path) -> int:
    return read_checkpoint(path, with_tensors=False)[0].step


def test_resume_from_a_truncated_newest_checkpoint_falls_back_to_the_previous_with_one_warning(tmp_path, capsys):
    assert main(run_args(tmp_path, "--max-steps", "4", "--eval-every", "2", "--checkpoint-every", "2")) == 0
    run = tmp_path / "run"
    newest, previous = run / "checkpoint.safetensors", run / "checkpoint.previous.safetensors"
    assert (step_of(newest), step_of(previous)) == (4, 2)
    assert not [path.name for path in run.iterdir() if path.name.endswith(".tmp")]
    adapter = load_file(run / "adapter" / "adapter_model.safetensors")
    losses = metrics(run, "loss")
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a disk fault mid-file
    capsys.readouterr()

    assert main(["--resume", str(run)]) == 0
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1
    assert re.fullmatch(re.escape(f"warning: {newest}: not a readable checkpoint (") + r"[^\n]+" + re.escape(
        "); resuming from checkpoint.previous.safetensors, of step 2 (the unreadable file is kept as "
        "checkpoint.safetensors.unreadable)"), warnings[0])
    # Steps 3 and 4 again, exactly as the first time; the step-4 checkpoint is new and the step-2 one still kept.
    for key, tensor in load_file(run / "adapter" / "adapter_model.safetensors").items():
        assert_close(tensor, adapter[key], rtol=0, atol=0)
    assert metrics(run, "loss") == losses
    assert (step_of(newest), step_of(previous)) == (4, 2)
    assert (run / "checkpoint.safetensors.unreadable").is_file()


def fake_checkpoint(path: Path, step: int) -> Path:
    """A file ``read_checkpoint`` accepts: a run state of ``step`` in its header, one tensor."""
    header = {"run_state": json.dumps(dataclasses.asdict(RunState(step=step))), "param_groups": "[]",
              "python_random": json.dumps(random.getstate())}
    save_file({"rng.torch.0": torch.get_rng_state()}, path, metadata=header)
    return path


def test_a_readable_newest_checkpoint_is_chosen_without_a_warning(tmp_path):
    newest = fake_checkpoint(tmp_path / "checkpoint.safetensors", 4)
    fake_checkpoint(previous_checkpoint(newest), 2)
    assert choose_checkpoint(newest) == (newest, "")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.previous.safetensors",
                                                                "checkpoint.safetensors"]


def test_a_missing_newest_checkpoint_falls_back_to_the_previous(tmp_path):
    # What a crash between the two renames leaves: the new file under its temporary name, the old as previous.
    newest = tmp_path / "checkpoint.safetensors"
    previous = fake_checkpoint(tmp_path / "checkpoint.previous.safetensors", 2)
    assert choose_checkpoint(newest) == (previous, f"warning: {newest}: no such file; resuming from "
                                                   "checkpoint.previous.safetensors, of step 2")


def test_two_unreadable_checkpoints_are_one_line_error_naming_both(tmp_path):
    newest = tmp_path / "checkpoint.safetensors"
    newest.write_bytes(b"\x00" * 3)
    previous_checkpoint(newest).write_text('{"not": "a checkpoint"}')
    with pytest.raises(ValueError) as raised:
        choose_checkpoint(newest)
    message = str(raised.value)
    assert message.startswith(f"no readable checkpoint to resume from: {newest}: not a readable checkpoint (")
    assert f"; {previous_checkpoint(newest)}: not a readable checkpoint (" in message
    assert "\n" not in message
    assert sorted(path.name for path in tmp_path.iterdir()) == ["checkpoint.previous.safetensors",
                                                                "checkpoint.safetensors"]  # nothing renamed


def test_a_failed_write_leaves_the_newest_and_the_previous_checkpoint_as_they_were(tmp_path):
    newest = fake_checkpoint(tmp_path / "checkpoint.safetensors", 4)
    previous = fake_checkpoint(previous_checkpoint(newest), 2)
    before = newest.read_bytes(), previous.read_bytes()

    def fail_midway(temporary: Path) -> None:
        temporary.write_bytes(b"half of a checkpoint")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space left"):
        write_atomically(newest, fail_midway, previous=previous)
    assert (newest.read_bytes(), previous.read_bytes()) == before
    assert sorted(path.name for path in tmp_path.iterdir()) == [previous.name, newest.name]


def test_every_rank_loads_the_checkpoint_rank_0_chose(tmp_path, monkeypatch):
    """Rank 1 of 2 does not choose: it loads the file named in rank 0's broadcast (here the previous,
    though the newest it could read itself is fine), so all ranks resume from the same step."""
    model = tiny_model("tiny-llama")
    inject_lora(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    run = tmp_path / "run"
    run.mkdir()
    save_checkpoint(run / "checkpoint.safetensors", model, optimizer, RunState(step=1))
    save_checkpoint(run / "checkpoint.safetensors", model, optimizer, RunState(step=2))
    decided = json.dumps({"run": str(run), "checkpoint": str(run / "checkpoint.previous.safetensors")})
    monkeypatch.setattr(loop.distributed, "broadcast_text", lambda text: decided if text == "" else pytest.fail())
    monkeypatch.setattr(loop, "choose_checkpoint", lambda path: pytest.fail("only rank 0 chooses"))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    config = TrainConfig(model="tiny-llama")
    _, state = loop.open_run(config, run, model, optimizer, scaler, loop.World(rank=1, size=2))
    assert state.step == 1


def test_nan_loss_stops_the_run_naming_the_step_and_keeps_the_checkpoint(tmp_path, capsys, monkeypatch):
    def load_poisoned(name, dtype=torch.float32):
        """The tiny model, whose third training forward returns NaN logits."""
        model, tokenizer = load_model(name, dtype)
        forward, calls = model.forward, []

        def poisoned(*args, **kwargs):
            output = forward(*args, **kwargs)
            if model.training:
                calls.append(1)
                if len(calls) == 3:
                    output.logits = output.logits * float("nan")
            return output

        model.forward = poisoned
        return model, tokenizer

    monkeypatch.setattr(loop, "load_model", load_poisoned)
    assert main(run_args(tmp_path, "--max-steps", "10", "--checkpoint-every", "1")) == 1
    err = capsys.readouterr().err
    assert "the loss is nan at step 3; the last good checkpoint, of step 2, stays in" in err
    model = tiny_model("tiny-llama")
    inject_lora(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert load_checkpoint(tmp_path / "run" / "checkpoint.safetensors", model, optimizer).step == 2


def test_training_stops_after_early_stop_evaluations_without_a_new_best(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(loop, "summed_nll", lambda *args, **kwargs: (1.0, 1))  # validation never improves
    assert main(run_args(tmp_path, "--max-steps", "10", "--eval-every", "2", "--early-stop", "2")) == 0
    assert "early stop at step 4" in capsys.readouterr().out
    assert sorted(metrics(tmp_path / "run", "loss")) == [1, 2, 3, 4]


def test_epochs_set_the_number_of_steps(tmp_path):
    from data.generated_tasks import generate_tasks
    from data.instructions import save_instructions
    from data.tasks import build_task

    data = save_instructions(generate_tasks(40, seed=0), tmp_path / "tasks.json")
    config, _ = parse_config(run_args(tmp_path, "--task", "instruct", "--data", str(data), "--epochs", "2",
                                      "--max-length", "128"))
    summary = train(config)
    n_train = len(build_task(config, char_tokenizer()).train)
    assert summary["steps"] == 2 * math.ceil(n_train / 4)  # batch size 4, no accumulation


def test_precision_auto_is_bf16_where_the_cpu_has_it_and_fp16_needs_a_gpu():
    cpu = torch.device("cpu")
    expected = "bf16" if cpu_supports_bf16() else "fp32"
    assert choose_precision("auto", cpu).name == expected
    assert not choose_precision("fp32", cpu).needs_loss_scaling
    with pytest.raises(ValueError, match="--precision fp16 needs a CUDA GPU"):
        choose_precision("fp16", cpu)


def test_fp16_on_the_cpu_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    assert main([*run_args(tmp_path), "--precision", "fp16"]) == 2
    err = capsys.readouterr().err
    assert "--precision fp16 needs a CUDA GPU" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("processes, strategy, refused", [(2, "fsdp2", True), (2, "ddp", False), (2, "auto", False),
                                                          (1, "fsdp2", False)])
def test_fp16_under_fsdp2_is_refused_by_validate_before_anything_loads(processes, strategy, refused):
    # A CUDA world, named only: asking for fp16 explicitly touches no GPU. One process ignores --strategy.
    world = loop.World(rank=0, size=processes, device=torch.device("cuda", 0))
    config = TrainConfig(precision="fp16", strategy=strategy)
    if refused:
        with pytest.raises(ValueError, match="--precision fp16 needs a gradient scaler, which this loop does not "
                                             "combine with FSDP2's sharded gradients"):
            config.validate(world)
    else:
        config.validate(world)


def test_without_matplotlib_the_run_says_so_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    assert main(run_args(tmp_path, "--max-steps", "1")) == 0
    assert "note: no loss.png: matplotlib is not installed (pip install matplotlib)" in capsys.readouterr().out
    assert not (tmp_path / "run" / "loss.png").exists()


def test_metrics_log_cumulative_training_flops(plain_run):
    from eval.flops import flops_of_model

    model = tiny_model("tiny-llama")
    inject_lora(model)
    per_step = 4 * flops_of_model(model, 64).total  # batch 4 windows of 64 tokens each step
    assert metrics(plain_run, "flops") == {step: step * per_step for step in (1, 2, 3, 4)}


def test_use_rslora_trains_with_alpha_over_sqrt_r_and_its_adapter_says_so(tmp_path):
    assert main(run_args(tmp_path, "--max-steps", "2", "--r", "4", "--use-rslora")) == 0
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_rslora"] is True
    model = tiny_model("tiny-llama")
    load_adapter(model, adapter)
    assert {layer.scaling for _, layer in lora_layers(model)} == {16.0 / 2}  # alpha 16 / sqrt(4)


def test_init_pissa_trains_and_saves_an_adapter_for_the_unmodified_base(tmp_path):
    assert main(run_args(tmp_path, "--max-steps", "2", "--r", "4", "--init", "pissa")) == 0
    adapter = tmp_path / "run" / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 32.0, True)  # rank 2r, plain
    model = tiny_model("tiny-llama")
    load_adapter(model, adapter)
    assert {layer.r for _, layer in lora_layers(model)} == {8}


def test_init_pissa_with_a_4bit_base_is_one_line_exit_2(tmp_path, capsys):
    assert main(run_args(tmp_path, "--init", "pissa", "--quantize", "nf4")) == 2
    assert "--init pissa takes the SVD of full-precision weights" in capsys.readouterr().err


def test_loraplus_ratio_moves_b_at_ratio_times_the_learning_rate_of_a(tmp_path, monkeypatch):
    built, original = [], loop.loraplus_optimizer

    def keep(*args, **kwargs):  # the loop's optimizer, kept to look at after the run
        built.append(original(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(loop, "loraplus_optimizer", keep)
    assert main(run_args(tmp_path, "--max-steps", "3", "--warmup-steps", "2", "--loraplus-ratio", "16")) == 0
    groups = {group["name"]: group for group in built[0].param_groups}
    last_lr = get_lr(2, 1e-3, 1e-4, 2, 3)  # the schedule at the last step
    assert (groups["lora_A"]["lr"], groups["lora_B"]["lr"]) == (last_lr, 16 * last_lr)


@pytest.mark.parametrize("ratio", ["-1", "inf"])
def test_a_bad_loraplus_ratio_is_one_line_exit_2(tmp_path, capsys, ratio):
    assert main(run_args(tmp_path, "--loraplus-ratio", ratio)) == 2
    assert "--loraplus-ratio must be 0 (off) or a number > 0" in capsys.readouterr().err


def test_use_dora_trains_a_b_and_m_and_its_adapter_loads_as_dora(tmp_path):
    assert main(run_args(tmp_path, "--max-steps", "2", "--use-dora")) == 0
    adapter = tmp_path / "run" / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["use_dora"] is True
    model = tiny_model("tiny-llama")
    load_adapter(model, adapter)
    saved = load_file(adapter / "adapter_model.safetensors")
    for name, layer in lora_layers(model):
        assert_close(layer.lora_magnitude_vector, saved[f"base_model.model.{name}.lora_magnitude_vector"], rtol=0, atol=0)


@pytest.mark.parametrize("argv, message", [
    (["--use-dora", "--quantize", "nf4"], "--use-dora needs the base in full precision"),
    (["--use-dora", "--lora-path", "fused"], "--use-dora takes the plain path"),
])
def test_use_dora_with_a_4bit_base_or_the_fused_path_is_one_line_exit_2(tmp_path, capsys, argv, message):
    assert main(run_args(tmp_path, *argv)) == 2
    assert message in capsys.readouterr().err


def test_an_embedding_target_trains_and_its_adapter_loads(tmp_path):
    assert main(run_args(tmp_path, "--max-steps", "2", "--targets", "embed_tokens,q_proj,v_proj")) == 0
    model = tiny_model("tiny-llama")
    load_adapter(model, tmp_path / "run" / "adapter")
    assert type(model.model.embed_tokens).__name__ == "LoRAEmbedding"
    assert model.model.embed_tokens.lora_embedding_A.abs().sum() > 0  # it trained: A starts at zero
