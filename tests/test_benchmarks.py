"""The benchmark scripts run on the tiny model and report every variant (numbers: benchmarks/README.md)."""

import pytest
import torch
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, Qwen2Config

from benchmarks.adapters import WAYS
from benchmarks.adapters import main as adapters
from benchmarks.inference import VARIANTS as INFERENCE_VARIANTS
from benchmarks.inference import main as inference
from benchmarks.lora_step import RANDOM_SHAPES, VARIANTS, paired_ratio
from benchmarks.lora_step import main as lora_step
from benchmarks.qlora import BASES, build, weight_bytes
from benchmarks.qlora import main as qlora
from benchmarks.thin_matmul import main as thin_matmul
from benchmarks.thin_matmul import products


def table_rows(output: str) -> list[list[str]]:
    """The cells of each data row of a Markdown table in ``output`` (header and rule left out)."""
    rows = [line.strip("| ").split(" | ") for line in output.splitlines() if line.startswith("| ")]
    return [row for row in rows[1:] if set(row[0]) != {"-"}]


def test_lora_step_benchmark_reports_every_variant_against_the_floor_and_peft(capsys):
    assert lora_step(["--model", "tiny-llama", "--warmup", "0", "--steps", "2"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row[0] for row in rows] == list(VARIANTS)
    assert rows[0][5] == "1.000" and rows[1][6] == "1.000"  # the floor against itself, peft against itself


def test_lora_step_benchmark_times_dora_here_and_in_peft_against_plain_lora(capsys):
    assert lora_step(["--model", "tiny-llama", "--warmup", "0", "--steps", "2", "--variants", "plain,dora,peft-dora"]) == 0
    assert [row[0] for row in table_rows(capsys.readouterr().out)] == ["plain", "dora", "peft-dora"]


def test_lora_step_benchmark_refuses_an_unknown_variant_by_name(capsys):
    with pytest.raises(SystemExit):
        lora_step(["--variants", "plain,doraa"])
    assert "--variants: unknown 'doraa'; choose from floor, peft, plain, fused, dora, peft-dora" in capsys.readouterr().err


def test_inference_benchmark_reports_base_unmerged_and_merged(capsys):
    assert inference(["--model", "tiny-llama", "--batch", "1", "--seq", "16", "--new-tokens", "2", "--steps", "1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row[0] for row in rows] == list(INFERENCE_VARIANTS)
    assert rows[0][2] == rows[0][4] == "1.000"  # the base model against itself


def test_adapters_benchmark_serves_every_count_three_ways_with_the_same_tokens(capsys):
    assert adapters(["--model", "tiny-llama", "--counts", "2,3", "--new-tokens", "3", "--steps", "1"]) == 0
    output = capsys.readouterr().out
    rows = table_rows(output)
    assert [(row[0], row[1]) for row in rows] == [(count, way) for count in ("2", "3") for way in WAYS]
    assert [row[4] for row in rows if row[1] == "mixed"] == ["1.00", "1.00"]  # mixed against itself
    assert "wrote the same tokens for every request: yes" in output


def test_random_qwen_shape_has_qwen2_5_0_5b_parameter_count():
    with torch.device("meta"):  # shapes only: no 2 GB of random weights
        model = AutoModelForCausalLM.from_config(Qwen2Config(**RANDOM_SHAPES["random-qwen2.5-0.5b"]))
    assert sum(parameter.numel() for parameter in model.parameters()) == 494_032_768  # Qwen2.5-0.5B's, tied


def test_paired_ratio_is_the_median_of_the_ratios_within_each_round():
    seconds = {"floor": [1.0, 2.0, 4.0], "fused": [1.1, 2.6, 4.0]}  # rounds 2 and 3 ran on a slower machine
    assert paired_ratio(seconds, "fused", "floor") == pytest.approx(1.1, rel=1e-12)  # ratios 1.1, 1.3, 1.0


def test_thin_products_give_the_same_numbers_in_both_orders():
    generator = torch.Generator().manual_seed(0)
    x, g, A, B = (torch.randn(*shape, generator=generator) for shape in ((32, 24), (32, 20), (4, 24), (20, 4)))
    for name, (columns, rows) in products(x, g, A, B).items():
        assert_close(rows(), columns(), rtol=1e-5, atol=1e-6, msg=name)


def test_thin_matmul_benchmark_reports_every_product_in_both_dtypes(capsys):
    assert thin_matmul(["--tokens", "16", "--in", "8", "--out", "8", "--r", "2", "--repeats", "1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [(row[0], row[1]) for row in rows] == [(name, dtype) for dtype in ("float32", "bfloat16")
                                                  for name in products(*[torch.zeros(1, 1)] * 4)]


def test_qlora_benchmark_reports_each_base_asked_for(capsys):
    # Two of the four: each base's memory is measured in a process of its own, seconds each.
    args = ["--model", "tiny-llama", "--seq", "16", "--warmup", "0", "--steps", "1", "--bases", "fp32,nf4-dq"]
    assert qlora(args) == 0
    assert [row[0] for row in table_rows(capsys.readouterr().out)] == ["fp32", "nf4-dq"]


def test_qlora_bases_hold_fewer_weight_bytes_in_order(tiny):
    sizes = {base: weight_bytes(build(tiny, base, r=4, targets=["q_proj"], device="cpu")[0]) for base in BASES}
    assert sizes["nf4-dq"] < sizes["nf4"] < sizes["bf16"] < sizes["fp32"]


@pytest.mark.distributed
def test_distributed_benchmark_reports_each_setup_and_ddp_sends_only_lora_gradients(capsys):
    from benchmarks.distributed import SETUPS
    from benchmarks.distributed import main as distributed_benchmark

    assert distributed_benchmark(["--model", "tiny-llama", "--seq", "16", "--warmup", "0", "--steps", "1"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert [row[0] for row in rows] == [*SETUPS, "full fine-tuning (ddp)"]
    lora_mb, full_mb = float(rows[1][4]), float(rows[3][4])
    assert 0 < lora_mb < full_mb  # the frozen base's gradients are never sent


def test_inference_benchmark_puts_our_decoding_beside_transformers_generate(capsys):
    from benchmarks.inference import VARIANTS as variants  # self-contained: imports of its own
    from benchmarks.inference import main as inference_benchmark

    args = ["--model", "tiny-llama", "--batch", "1", "--seq", "16", "--new-tokens", "4", "--steps", "1"]
    assert inference_benchmark(args) == 0
    out = capsys.readouterr().out
    lines = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")]
    header, rows = lines[0], lines[2:]
    assert header[5:] == ["tokens/s", "transformers generate, tokens/s", "/ transformers"]
    assert [row[0] for row in rows] == list(variants)
    assert all(float(row[5]) > 0 and float(row[6]) > 0 and float(row[7]) > 0 for row in rows)
    assert "generate wrote the same tokens: yes." in out  # greedy from the same model: the two loops agree
