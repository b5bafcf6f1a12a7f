"""Distributed training under torchrun (gloo, 2 processes on the CPU) against the single-process loop.

Two launches: ``tests/distributed_worker.py`` runs the DDP and FSDP2 scenarios and the checks that
need a live process group; ``tests/kill_worker.py`` runs the CLI with a worker killed mid-run, and
torchrun restarts it.
Each launch runs in its own process group, killed whole on a timeout (``distributed.torchrun``).
"""

import json
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from distributed_worker import BASE, RESUMED, SCENARIOS, single_process_twin
from lora import load_adapter
from models.loader import load_model
from training import distributed
from training.config import parse_config
from training.distributed import World
from training.loop import train

pytestmark = pytest.mark.distributed
WORKER = Path(__file__).parent / "distributed_worker.py"
KILL_WORKER = Path(__file__).parent / "kill_worker.py"


def adapter(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "adapter" / "adapter_model.safetensors")


def logged(run: Path, key: str) -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {record["step"]: record[key] for record in records if key in record}


def single_process(tmp_path: Path, name: str, settings: list[str]) -> Path:
    config, _ = parse_config([*BASE, *settings, "--out", str(tmp_path), "--name", name])
    train(config, world=World())
    return tmp_path / name


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> Path:
    """The worker's runs and findings, from one 2-process launch."""
    out = tmp_path_factory.mktemp("distributed")
    result = distributed.torchrun([str(WORKER), str(out)], processes=2, timeout=400)
    assert result.returncode == 0, result.stderr[-4000:]
    return out


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_two_processes_train_as_one_process_with_twice_the_accumulation(launched, tmp_path, name):
    twin = single_process(tmp_path, name, single_process_twin(SCENARIOS[name]))
    spread, alone = adapter(launched / name), adapter(twin)
    assert spread.keys() == alone.keys()
    # One micro-batch per rank: both sum the same two gradients, a + b, so the adapters are equal
    # bit for bit. Accumulating two per rank adds (a + c) + (b + d) instead of ((a + b) + c) + d.
    exact = "--grad-accum" not in SCENARIOS[name]
    tolerance = {"rtol": 0, "atol": 0} if exact else {}
    for key in alone:
        assert_close(spread[key], alone[key], **tolerance)
    assert_close(logged(launched / name, "loss"), logged(twin, "loss"), **tolerance)
    assert_close(logged(launched / name, "val_loss"), logged(twin, "val_loss"))  # the ranks score strided shards


def test_resumed_under_torchrun_from_the_previous_checkpoint_ends_as_an_uninterrupted_run(launched, tmp_path):
    name, first, then = RESUMED
    assert (launched / name / "checkpoint.safetensors.unreadable").is_file()  # rank 0 fell back to step 1
    straight = single_process(tmp_path, "straight", single_process_twin([*first[:-2], *then]))
    resumed = adapter(launched / name)
    for key, tensor in adapter(straight).items():
        assert_close(resumed[key], tensor, rtol=0, atol=0)
    assert sorted(logged(launched / name, "loss")) == [1, 2, 3, 4]


def test_ddp_all_reduces_the_lora_gradients_and_never_the_base(launched):
    findings = json.loads((launched / "findings.json").read_text())
    assert findings["world_size"] == 2
    for measured in (findings["ddp_bytes"], findings["ddp_bytes_nf4"]):
        assert measured["sent"] == measured["trainable"]  # one exchange per step, however many micro-batches
        assert measured["frozen"] > 5 * measured["trainable"]  # never sent: 7x the LoRA bytes even in 4 bits


def test_fsdp2_bf16_policy_leaves_the_4bit_storage_as_stored(launched):
    seen = json.loads((launched / "findings.json").read_text())["fsdp2_bf16"]
    assert seen["storage_dtypes"] == ["torch.float32", "torch.uint8"]  # codes and float8 bytes; block scales
    assert seen["dequantized_as_before"] and seen["layers"] > 0
    assert seen["lora_dtypes"] == ["torch.bfloat16"]  # the policy does apply to A and B


def test_ddp_names_the_parameter_that_got_no_gradient(launched):
    error = json.loads((launched / "findings.json").read_text())["disabled_adapter_error"]
    assert "model.layers.0.self_attn.q_proj.lora_A.weight got no gradient in step 1" in error
    assert "was its adapter disabled?" in error


def test_cli_under_torchrun_restarts_a_killed_worker_and_its_adapter_loads_in_peft(tmp_path):
    """The training CLI under torchrun, rank 1 killed after step 3: the restarted group resumes from
    the checkpoint of step 2 and ends where an uninterrupted run does; peft reads its adapter."""
    from peft import PeftModel

    settings = ["--max-steps", "5", "--checkpoint-every", "2", "--eval-every", "5"]
    result = distributed.torchrun([str(KILL_WORKER), "1:3", *BASE, *settings, "--out", str(tmp_path / "runs")],
                                  processes=2, timeout=300, max_restarts=1)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"exitcode: -{int(signal.SIGKILL)}" in result.stderr or "SIGKILL" in result.stderr  # it did die
    (run,) = (tmp_path / "runs").iterdir()  # named after the rendezvous id, found again after the restart
    assert result.stdout.count("done:") == 1  # rank 0 alone prints
    assert sorted(logged(run, "loss")) == [1, 2, 3, 4, 5]

    straight = single_process(tmp_path, "straight", single_process_twin(settings))
    for key, tensor in adapter(straight).items():
        assert_close(adapter(run)[key], tensor, rtol=0, atol=0)

    model, _ = load_model("tiny-llama")
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    theirs = PeftModel.from_pretrained(load_model("tiny-llama")[0], run / "adapter").eval()
    load_adapter(model, run / "adapter")
    with torch.no_grad():
        assert_close(theirs(ids).logits, model.eval()(ids).logits, rtol=0, atol=0)
