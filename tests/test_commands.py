"""Every command the READMEs and the tutorials name exists, with every flag they give it: prose cannot
drift from the code any more than the chapters' outputs can. And README.md stays a page of essentials.

A command is ``python -m MODULE ...`` or ``torchrun ... -m MODULE ...`` in a code span or in a shell
block (a fenced block without a language); its flags must appear in ``python -m MODULE --help``
(torchrun's own flags in ``torch.distributed.run``'s). A flag quoted alone (```--strategy``` in a
sentence) must appear in the help of some command the same page names, or in a command the page
writes out (``pip install --no-deps ...``).
"""

import contextlib
import io
import re
import runpy
import shlex
import sys
import warnings
from functools import cache
from pathlib import Path

import pytest

from tutorials.chapters import blocks, chapters

ROOT = Path(__file__).parent.parent
PAGES = [ROOT / "README.md", ROOT / "tutorials" / "README.md", ROOT / "results" / "README.md",
         ROOT / "benchmarks" / "README.md", ROOT / "tests" / "README.md", *chapters()]
FLAG = re.compile(r"^--[a-z][a-z0-9-]*")


def shell_lines(text: str) -> list[str]:
    """Each code span, and each line of a shell block (continuation lines joined, comments dropped)."""
    lines = [span.replace("\\|", "|") for span in re.findall(r"(?<!`)`([^`\n]+)`(?!`)", text)]
    for kind, code, _ in blocks(text):
        if kind in ("", "bash", "sh", "shell"):
            for line in code.replace("\\\n", " ").splitlines():
                lines.append(line.split(" #", 1)[0])
    return lines


def commands(text: str) -> list[tuple[str, list[str]]]:
    """``(module, its flags)`` for each command in ``text``; torchrun's own flags go to torch.distributed.run."""
    found = []
    for line in shell_lines(text):
        try:
            words = shlex.split(line.replace("[", " ").replace("]", " ").replace("|", " "))
        except ValueError:  # an unclosed quote: prose, not a command
            continue
        for start, word in enumerate(words):
            launcher = word == "torchrun" or words[start:start + 3] == ["python", "-m", "torch.distributed.run"]
            if launcher:
                rest = words[start + (1 if word == "torchrun" else 3):]
                inner = rest.index("-m") if "-m" in rest else len(rest)
                found.append(("torch.distributed.run", [w for w in rest[:inner] if FLAG.match(w)]))
                if inner < len(rest) - 1:
                    found.append((rest[inner + 1], [w for w in rest[inner + 2:] if FLAG.match(w)]))
                break
            if words[start:start + 2] == ["python", "-m"] and start + 2 < len(words):
                found.append((words[start + 2], [w for w in words[start + 3:] if FLAG.match(w)]))
                break
    return [(module, [FLAG.match(flag).group(0) for flag in flags]) for module, flags in found]


def lone_flags(text: str) -> list[str]:
    """Flags quoted on their own in the prose: ```--strategy``` or ```--strategy fsdp2```."""
    return [FLAG.match(span).group(0) for span in re.findall(r"(?<!`)`(--[a-z][^`\n]*)`(?!`)", text)]


@cache
def help_text(module: str) -> str:
    """What ``python -m module --help`` prints, run in this process (the modules are imported already)."""
    printed, argv = io.StringIO(), sys.argv
    sys.argv = [module, "--help"]
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # "found in sys.modules": a module run as __main__
            with contextlib.suppress(SystemExit):  # argparse exits after --help (torchrun's main returns)
                runpy.run_module(module, run_name="__main__", alter_sys=False)
    finally:
        sys.argv = argv
    return printed.getvalue()


def test_commands_are_found_in_a_page():
    text = ("Run `python -m training.loop --task instruct --max-steps 100`, or\n\n```\n"
            "torchrun --standalone --nproc-per-node 2 -m training.loop \\\n    --strategy fsdp2  # sharded\n```\n")
    assert commands(text) == [("training.loop", ["--task", "--max-steps"]),
                              ("torch.distributed.run", ["--standalone", "--nproc-per-node"]),
                              ("training.loop", ["--strategy"])]
    assert lone_flags("`--strategy` is `auto`, `--out /tmp/jobs` too") == ["--strategy", "--out"]


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_command_and_flag_a_page_names_is_in_its_help(page):
    text, where = page.read_text(), page.relative_to(ROOT)
    named = commands(text)
    for module, flags in named:
        if module == "pytest":
            continue  # running pytest's own main inside a test run would start a second session
        listed = help_text(module)
        for flag in flags:
            assert re.search(rf"{flag}(?![\w-])", listed), f"{where}: `python -m {module}` has no {flag} (see its --help)"
    offered = "".join(help_text(module) for module in {module for module, _ in named} if module != "pytest")
    written = " ".join(line for line in shell_lines(text) if not line.startswith("--"))
    for flag in lone_flags(text):
        assert re.search(rf"{flag}(?![\w-])", offered + written), f"{where}: {flag} is in no command the page names"


def test_readme_is_at_most_200_lines():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= 200, (f"README.md has {lines} lines, more than 200: move measurements to results/README.md "
                          "or benchmarks/README.md, test details to tests/README.md, and a module's API to its "
                          "docstring, leaving a link")
