"""The benchmark scripts run on the tiny model and report every variant (numbers: benchmarks/README.md)."""

from benchmarks.lora_step import VARIANTS
from benchmarks.lora_step import main as lora_step


def table_rows(output: str) -> list[list[str]]:
    """The cells of each data row of a Markdown table in ``output`` (header and rule left out)."""
    rows = [line.strip("| ").split(" | ") for line in output.splitlines() if line.startswith("| ")]
    return [row for row in rows[1:] if set(row[0]) != {"-"}]


def test_lora_step_benchmark_reports_every_variant_against_the_floor_and_peft(capsys):
    assert lora_step(["--model", "tiny-llama", "--warmup", "0", "--steps", "2"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row[0] for row in rows] == list(VARIANTS)
    assert rows[0][5] == "1.000" and rows[1][6] == "1.000"  # the floor against itself, peft against itself
