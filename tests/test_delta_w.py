"""``python -m experiments.delta_w``: the full fine-tune whose ΔW it measures, and the report it writes."""

import torch

from experiments.delta_w import main
from experiments.full_finetune import full_finetune
from models.loader import load_model


def test_full_finetune_trains_only_q_and_v_and_returns_their_change():
    model, tokenizer = load_model("tiny-llama")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    examples = [{"input_ids": [5, 6, 7, 8, 9, 10], "attention_mask": [1] * 6, "labels": [-100, -100, 7, 8, 9, 10]}] * 4
    data = type("Data", (), {"train": examples, "validation": examples})()
    result = full_finetune(model, data, tokenizer, steps=3, lr=1e-2, eval_examples=2)
    assert sorted({name.rsplit(".", 1)[-1] for name in result.deltas}) == ["q_proj", "v_proj"]
    for name, parameter in model.named_parameters():
        module = name.removesuffix(".weight")
        if module in result.deltas:
            torch.testing.assert_close(parameter.float() - before[name], result.deltas[module])
            assert parameter.dtype == torch.float32  # what trains stays fp32
            assert result.deltas[module].abs().max() > 0
        else:
            torch.testing.assert_close(parameter.float(), before[name].to(parameter.dtype).float())


def test_the_command_writes_its_report_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["--model", "tiny-llama", "--steps", "2", "--lora-steps", "2", "--out", str(out),
                 "--runs-folder", str(tmp_path / "runs")]) == 0
    text = (out / "delta_w.md").read_text()
    assert text.startswith("# Is ΔW really low-rank?")
    for heading in ("rank for 90% energy", "amplification", "φ(1, 1)"):
        assert heading in text
    assert (out / "energy.png").is_file() and (out / "subspace_similarity.png").is_file()


def test_the_command_names_the_fix_for_a_bad_rank_list(capsys):
    assert main(["--ranks", "8", "--model", "tiny-llama"]) == 2
    assert "--ranks 8,32" in capsys.readouterr().err
