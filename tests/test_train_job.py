"""The whole-job benchmark runs on the tiny model and reports every variant (numbers: benchmarks/README.md)."""

from benchmarks.train_job import VARIANTS, main


def test_train_job_benchmark_reports_every_variant_against_before_and_peft(capsys):
    assert main(["--model", "tiny-llama", "--warmup", "0", "--steps", "2", "--no-memory"]) == 0
    out = capsys.readouterr().out
    rows = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")][2:]
    assert [row[0] for row in rows] == list(VARIANTS)
    assert rows[0][3] == "1.00" and rows[2][4] == "1.00"  # before against itself, peft against itself
    assert "targets: tokens/s at least 1.2x peft's" in out
