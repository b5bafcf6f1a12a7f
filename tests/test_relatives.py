"""The relatives study's pieces: each variant's one change, the model and optimizer each builds, the timing, the report.

One tiny study (tiny-llama, one step per variant, in this process) is run once for the module;
spies on the training loop's ``inject_lora`` and ``loraplus_optimizer`` record what each run built.
"""

import json
import math
from dataclasses import asdict

import pytest
import torch
from torch.testing import assert_close

import data.tasks
import training.loop
from experiments.relatives import (
    LABELS,
    VARIANTS,
    StudyConfig,
    build_parser,
    child_argv,
    flags,
    main,
    relatives_table,
    run_study,
    seconds_per_step,
    step_tokens,
    train_config,
    trainable_count,
    write_report,
)
from lora import lora_layers
from lora.dora import DoRALinear, column_norm

TINY = dict(model="tiny-llama", steps=2, eval_batches=1)
real_task_parts = data.tasks.task_parts


def few_examples(task, path=None, noise=0.0):
    """The task's first 40 train and 8 validation records: tokenizing all 12,000 would take most of each run."""
    parts = real_task_parts(task, path, noise)
    return {**parts, "train": parts["train"][:40], "validation": parts["validation"][:8]}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """``(config, rows, built)``: the tiny study, its rows, and per run what inject_lora and LoRA+ built in it.

    Each row's seconds per step already checks that the steps' tokens, planned again by
    ``step_tokens``, add up to the tokens the loop trained on (``run_variant`` raises otherwise).
    """
    built, real_inject, real_loraplus = [], training.loop.inject_lora, training.loop.loraplus_optimizer

    def inject_spy(model, *args, **kwargs):
        targets = real_inject(model, *args, **kwargs)
        layers = [layer for _, layer in lora_layers(model)]
        # What the run starts from, taken now: training moves A, B and m afterwards.
        built.append({"layers": layers, "optimizer": None,
                      # The base is bf16 where the CPU computes bf16 (the loop's auto precision), m float32.
                      "magnitude_is_row_norm": [torch.equal(layer.lora_magnitude_vector.detach(),
                                                            column_norm(layer.base_layer.weight.float()))
                                                for layer in layers if isinstance(layer, DoRALinear)],
                      "B_zero": [not layer.lora_B.weight.any() for layer in layers],
                      "A_row_norms": [layer.lora_A.weight.detach().norm(dim=1) for layer in layers],
                      "B_column_norms": [layer.lora_B.weight.detach().norm(dim=0) for layer in layers]})
        return targets

    def loraplus_spy(*args, **kwargs):
        built[-1]["optimizer"] = real_loraplus(*args, **kwargs)
        return built[-1]["optimizer"]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(training.loop, "inject_lora", inject_spy)
        patch.setattr(training.loop, "loraplus_optimizer", loraplus_spy)
        patch.setattr(data.tasks, "task_parts", few_examples)
        config = StudyConfig(**TINY, isolate=False)
        rows = run_study(config, tmp_path_factory.mktemp("runs"))
    return config, rows, dict(zip(VARIANTS, built))


def test_each_variant_changes_exactly_its_one_setting_of_the_loop(tmp_path):
    config = StudyConfig()
    plain = asdict(train_config(config, "lora", tmp_path))
    for variant, change in VARIANTS.items():
        settings = asdict(train_config(config, variant, tmp_path))
        differ = {key for key in settings if settings[key] != plain[key]} - {"name"}
        assert differ == set(change), variant
        assert all(settings[key] == value for key, value in change.items())
        assert (settings["r"], settings["alpha"], settings["targets"], settings["lr"]) == (8, 16.0, "q_proj,v_proj",
                                                                                          1e-3)


def test_the_study_trains_one_run_per_variant_in_order_from_one_start(study):
    _, rows, built = study
    assert [row["variant"] for row in rows] == list(VARIANTS) and list(built) == list(VARIANTS)
    # LoRA, rsLoRA, DoRA and LoRA+ start at the base model exactly (B = 0; DoRA's scale is 1). PiSSA starts at
    # base = residual + B A, with the residual W - B A rounded to the base's dtype: bf16 where the CPU computes it
    # natively (8 bits of mantissa), which moved the loss by 1.3e-4 of itself on an AMD EPYC (under 1e-4 on a Xeon).
    starts = {row["variant"]: row["val_loss_start"] for row in rows}
    assert len({starts[name] for name in ("lora", "rslora", "dora", "loraplus")}) == 1
    assert math.isclose(starts["pissa"], starts["lora"], rel_tol=1e-3)


def test_plain_lora_is_the_papers_layer_and_one_adamw_learning_rate(study):
    layers = study[2]["lora"]["layers"]
    assert all(type(layer).__name__ == "LoRALinear" and layer.scaling == 16 / 8 for layer in layers)
    assert all(study[2]["lora"]["B_zero"]) and study[2]["lora"]["optimizer"] is None


def test_rslora_scales_by_alpha_over_the_square_root_of_r(study):
    assert all(layer.scaling == 16 / math.sqrt(8) for layer in study[2]["rslora"]["layers"])


def test_dora_layers_start_with_m_equal_to_the_row_norms_of_w(study):
    dora = study[2]["dora"]
    assert all(isinstance(layer, DoRALinear) for layer in dora["layers"])
    assert dora["magnitude_is_row_norm"] and all(dora["magnitude_is_row_norm"])


def test_pissa_starts_from_the_principal_part_with_b_not_zero(study):
    pissa = study[2]["pissa"]
    assert not any(pissa["B_zero"])
    # sqrt(S_r / s) on each side: A's rows and B's columns start equally long (float32 SVD rounding apart).
    for A_norms, B_norms in zip(pissa["A_row_norms"], pissa["B_column_norms"]):
        assert_close(A_norms, B_norms, rtol=1e-5, atol=0)


def test_loraplus_trains_b_at_16_times_as_lr(study):
    groups = study[2]["loraplus"]["optimizer"].param_groups
    assert [(group["name"], group["lr_scale"]) for group in groups] == [("lora_A", 1.0), ("lora_B", 16.0)]
    assert all(study[2][name]["optimizer"] is None for name in VARIANTS if name != "loraplus")


def test_rows_count_the_parameters_inject_lora_leaves_trainable(study, tmp_path):
    config, rows, built = study
    for row in rows:
        layers = built[row["variant"]]["layers"]
        expected = sum(p.numel() for layer in layers for p in layer.parameters() if p.requires_grad)
        assert row["trainable"] == expected == trainable_count(train_config(config, row["variant"], tmp_path))
    outputs = sum(layer.base_layer.out_features for layer in built["dora"]["layers"])
    assert rows[2]["trainable"] - rows[0]["trainable"] == outputs  # one m per output of each adapted layer


def test_step_tokens_are_the_tokens_of_each_planned_step(study, tmp_path):
    config, rows, _ = study
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data.tasks, "task_parts", few_examples)
        tokens = step_tokens(train_config(config, "lora", tmp_path))
    assert len(tokens) == config.steps and all(count > 0 for count in tokens)


def test_seconds_per_step_is_each_steps_tokens_over_its_tokens_per_second(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(entry) + "\n" for entry in [
        {"step": 0, "val_loss": 3.0}, {"step": 1, "loss": 2.0, "tokens_per_second": 10.0},
        {"step": 2, "loss": 1.0, "tokens_per_second": 40.0}, {"step": 2, "val_loss": 1.5}]))
    assert seconds_per_step(metrics, [10, 20]) == (10 / 10 + 20 / 40) / 2


def test_table_has_one_row_per_variant_naming_its_flag(study):
    _, rows, _ = study
    lines = relatives_table(rows).splitlines()[2:]
    assert [line.split(" | ")[:2] for line in lines] == [[f"| {LABELS[name]}", flags(VARIANTS[name]) or "(none)"]
                                                          for name in VARIANTS]
    assert [flags(change) for change in VARIANTS.values()] == ["", "--use-rslora", "--use-dora", "--init pissa",
                                                               "--loraplus-ratio 16"]
    assert all(line.endswith("| n/a |") for line in lines)  # one shared process: no run's own peak memory


def test_report_writes_markdown_json_and_plot(study, tmp_path):
    config, rows, _ = study
    config = StudyConfig(**{**asdict(config), "out": str(tmp_path / "out")})
    path = write_report(rows, config, "python -m experiments.relatives --model tiny-llama", 1.0)
    report = path.read_text()
    assert report.startswith("# LoRA's relatives, measured\n") and "`python -m experiments.relatives" in report
    assert relatives_table(rows) in report
    written = json.loads((tmp_path / "out" / "relatives.json").read_text())
    assert [row["variant"] for row in written["rows"]] == list(VARIANTS) and written["config"]["model"] == "tiny-llama"
    assert (tmp_path / "out" / "relatives.png").stat().st_size > 0


def test_child_command_line_carries_every_setting_of_the_study(tmp_path):
    config = StudyConfig(model="tiny-llama", steps=7, eval_batches=2, r=4, alpha=8.0, targets="q_proj", lr=2e-3, seed=3,
                         data=str(tmp_path / "tasks.jsonl"))
    parsed = vars(build_parser().parse_args(child_argv(config, "dora", tmp_path, tmp_path / "row.json")))
    assert "--data" not in child_argv(StudyConfig(), "dora", tmp_path, tmp_path / "row.json")  # None: the default
    assert (parsed["variant"], parsed["row_out"], parsed["runs_folder"]) == ("dora", str(tmp_path / "row.json"),
                                                                              str(tmp_path))
    for key, value in asdict(config).items():
        if key not in ("variants", "isolate", "out", "runs_folder"):
            assert parsed[key] == value, key


def test_one_variant_alone_writes_its_row_with_its_own_peak_memory(tmp_path):
    row_path = tmp_path / "row.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(data.tasks, "task_parts", few_examples)
        assert main(["--variant", "rslora", "--row-out", str(row_path), "--runs-folder", str(tmp_path / "runs"),
                     "--model", "tiny-llama", "--steps", "1", "--eval-batches", "1"]) == 0
    row = json.loads(row_path.read_text())
    assert (row["variant"], row["isolated"], row["change"]) == ("rslora", True, {"use_rslora": True})
    assert row["peak_rss_mb"] > 0 and row["seconds_per_step"] > 0


@pytest.mark.parametrize("flags_given, named", [(["--variants", "lora,qlora"], "--variants"),
                                                (["--steps", "0"], "--steps"),
                                                (["--eval-batches", "0"], "--eval-batches"),
                                                (["--variant", "dora"], "--variant")])
def test_a_bad_option_stops_before_training_with_one_line_naming_it(flags_given, named, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--model", "tiny-llama", *flags_given])
    assert stopped.value.code == 2
    assert named in capsys.readouterr().err
