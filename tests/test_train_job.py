"""The whole-job benchmark runs on the tiny model and reports every variant (numbers: benchmarks/README.md)."""

import pytest

from benchmarks.train_job import VARIANTS, main

# Two steps of the tiny model, and the rate measured on a 256 x 256 bf16 matmul rather than 2048 x 2048,
# which takes minutes where bf16 is emulated.
QUICK = ["--model", "tiny-llama", "--warmup", "0", "--steps", "2", "--no-memory", "--matmul-size", "256"]


def test_train_job_benchmark_reports_every_variant_against_before_and_peft(capsys):
    assert main(QUICK) == 0
    out = capsys.readouterr().out
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")][2:]
    assert [row[0] for row in rows] == list(VARIANTS)
    assert rows[0][3] == "1.00" and rows[2][4] == "1.00"  # before against itself, peft-bf16 against itself
    assert "targets: tokens/s at least 1.2x peft's" in out


def test_train_job_ablations_and_profile_run_and_unknown_variant_is_named(capsys):
    assert main([*QUICK, "--profile", "--variants", "now,now-full-logits,now-eager-attention"]) == 0
    out = capsys.readouterr().out
    assert "where a step of now goes" in out and "aten::mm" in out
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")]
    assert [row[0] for row in rows if row[0].startswith("now")] == ["now", "now-full-logits", "now-eager-attention"]
    with pytest.raises(SystemExit):
        main(["--model", "tiny-llama", "--variants", "now,later"])
    assert "unknown 'later'" in capsys.readouterr().err
