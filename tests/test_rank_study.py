"""The rank study's pieces: the alpha rules, the parameter counts, the plan, and a tiny run end to end."""

import json

import pytest
import torch
from torch import nn

from experiments.rank_study import (
    FIXED_ALPHA,
    TABLE5,
    Run,
    alpha_for,
    lora_parameter_count,
    main,
    planned_runs,
    rank_table,
    scaling_for,
)
from lora import LoRALinear, count_parameters, inject_lora, parse_targets
from models.loader import EMBEDDED, tiny_model

RANKS = (1, 2, 4, 8, 16, 32, 64)


@pytest.mark.parametrize("r", RANKS)
def test_alpha_rules_give_the_scaling_they_claim(r):
    """fixed: alpha = 16 so the layer scales by 16 / r; 2r: alpha = 2 r so it scales by 2 whatever r."""
    assert scaling_for("fixed", r) == FIXED_ALPHA / r
    assert scaling_for("2r", r) == 2.0
    for policy in ("fixed", "2r"):
        layer = LoRALinear(nn.Linear(8, 8), r=r, alpha=alpha_for(policy, r))
        assert layer.scaling == scaling_for(policy, r)


def test_an_unknown_alpha_rule_is_an_error_that_lists_the_rules():
    with pytest.raises(ValueError, match="choose one of fixed, 2r"):
        alpha_for("sqrt", 8)


@pytest.mark.parametrize("targets", ["q_proj", "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj", "gate_proj"])
@pytest.mark.parametrize("r", [1, 4])
def test_parameter_count_equals_what_inject_lora_leaves_trainable(targets, r):
    model = tiny_model("tiny-llama")
    inject_lora(model, parse_targets(targets), r=r, alpha=FIXED_ALPHA)
    trainable, _ = count_parameters(model)
    assert lora_parameter_count("tiny-llama", targets, r) == trainable


def test_parameter_counts_of_table5_on_smollm2_are_r_times_in_plus_out_per_layer():
    """30 layers; q and o are 576 -> 576, k and v 576 -> 192 (grouped-query attention): budgets not all equal."""
    width = {"q_proj": 576 + 576, "k_proj": 576 + 192, "v_proj": 576 + 192, "o_proj": 576 + 576}
    for targets, r in TABLE5:
        expected = 30 * r * sum(width[name] for name in targets.split(","))
        assert lora_parameter_count(EMBEDDED, targets, r) == expected
    assert [lora_parameter_count(EMBEDDED, targets, r) for targets, r in TABLE5] == [276_480, 230_400, 230_400]


def test_runs_with_the_same_targets_rank_and_alpha_share_a_name_so_they_train_once():
    runs = planned_runs([4, 8], ["fixed", "2r"], table5=True)
    names = [run.name for run in runs]
    assert len(runs) == 2 * 2 + len(TABLE5)
    assert Run("fixed", 8).name == Run("2r", 8).name  # alpha = 16 both ways
    assert Run("fixed", 4).name == Run("fixed", 4, "q_proj,v_proj", "table5").name  # Table 5's q, v at r = 4
    assert len(set(names)) == len(names) - 2


def test_rank_table_has_one_row_per_sweep_run_and_none_for_table5():
    row = dict(alpha=16.0, scaling=2.0, targets="q_proj,v_proj", trainable=10, val_loss_start=2.0,
               val_loss_end=1.0, seconds=1.0)
    rows = [{**row, "policy": "fixed", "r": 8, "part": "sweep"}, {**row, "policy": "2r", "r": 8, "part": "sweep"},
            {**row, "policy": "fixed", "r": 4, "part": "table5"}]
    lines = rank_table(rows).splitlines()
    assert lines[2:] == ["| fixed 16 | 8 | 16 | 2 | 10 | 2.0000 | 1.0000 |",
                         "| 2r | 8 | 16 | 2 | 10 | 2.0000 | 1.0000 |"]


def test_a_tiny_study_writes_a_table_with_one_row_per_rule_and_rank(tmp_path):
    out, runs = tmp_path / "out", tmp_path / "runs"
    assert main(["--model", "tiny-llama", "--ranks", "2,8", "--steps", "2", "--eval-batches", "1", "--no-table5",
                 "--out", str(out), "--runs-folder", str(runs)]) == 0
    report = (out / "rank_study.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| fixed 16 |", "| 2r |"))]
    assert [line.split(" | ")[:2] for line in rows] == [["| fixed 16", "2"], ["| fixed 16", "8"], ["| 2r", "2"],
                                                         ["| 2r", "8"]]
    assert (out / "rank_study.png").stat().st_size > 0
    written = json.loads((out / "rank_study.json").read_text())["rows"]
    assert [(row["policy"], row["r"]) for row in written] == [("fixed", 2), ("fixed", 8), ("2r", 2), ("2r", 8)]
    # r = 8 is the same run under both rules (alpha = 16): three run folders for four rows
    assert sorted(path.name for path in runs.iterdir()) == [
        "q_proj+v_proj-r2-alpha16", "q_proj+v_proj-r2-alpha4", "q_proj+v_proj-r8-alpha16"]
    torch.testing.assert_close(written[1]["val_loss_end"], written[3]["val_loss_end"], rtol=0, atol=0)


@pytest.mark.parametrize("flags, named", [(["--ranks", "0,8"], "--ranks"), (["--ranks", "eight"], "--ranks"),
                                          (["--policies", "fixed,sqrt"], "--policies"), (["--steps", "0"], "--steps"),
                                          (["--eval-batches", "0"], "--eval-batches")])
def test_a_bad_option_stops_before_training_with_one_line_naming_it(flags, named, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--model", "tiny-llama", *flags])
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err
