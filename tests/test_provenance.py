"""A report's first line: the command that reruns it, the date, the minutes it took, the machine."""

import re
import time

import torch

from eval.provenance import machine, provenance, rerun_command


def test_rerun_command_is_the_module_and_its_arguments(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert rerun_command("eval.forecast", ["--systems", "3"]) == "python -m eval.forecast --systems 3"


def test_rerun_command_keeps_the_thread_count_it_ran_with(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert rerun_command("experiments.rank_study", []) == "OMP_NUM_THREADS=1 python -m experiments.rank_study"


def test_machine_names_torch_threads_and_version():
    threads = torch.get_num_threads()
    assert machine().endswith(f", {threads} torch thread{'' if threads == 1 else 's'}, torch {torch.__version__}")


def test_provenance_is_command_date_minutes_and_machine():
    line = provenance("python -m eval.forecast", seconds=150.0)
    date = time.strftime("%Y-%m-%d", time.gmtime())
    assert line == f"`python -m eval.forecast`, {date}, 2 min on {machine()}."
    assert re.fullmatch(r"`[^`]+`, \d{4}-\d{2}-\d{2}, \d+ min on .+\.", line)
