"""Every tutorial runs: each ```python block in order, in one namespace per chapter, and each
```output block right after a python block must equal what that block printed."""

import contextlib
import copy
import io
import re
from pathlib import Path

import pytest

from models import loader

TUTORIALS = sorted((Path(__file__).parent.parent / "tutorials").glob("[0-9][0-9]_*.md"))
# Chapters that load the embedded model or its tokenizer run with the slow tests.
SLOW = {"02_targets_and_injection.md", "03_data.md"}
# Chapters that launch torchrun run with the distributed tests.
DISTRIBUTED = {"08_distributed.md"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def blocks(text):
    """``(kind, code, line)`` for each fenced block: kind is the info string, line where it starts."""
    for match in FENCE.finditer(text):
        yield match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1


def steps(text):
    """``(code, expected output or None, line)`` for each python block."""
    found = list(blocks(text))
    for index, (kind, code, line) in enumerate(found):
        if kind == "python":
            following = found[index + 1] if index + 1 < len(found) else None
            expected = following[1] if following and following[0] == "output" else None
            yield code, expected, line


def normalize(text):
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def test_every_output_block_follows_a_python_block():
    for path in TUTORIALS:
        found = list(blocks(path.read_text()))
        for previous, (kind, _, line) in zip([None, *found], found):
            if kind == "output":
                assert previous is not None and previous[0] == "python", f"{path.name}:{line}: output after no code"


def test_tutorials_are_numbered_without_gaps():
    numbers = [int(path.name[:2]) for path in TUTORIALS]
    assert numbers == list(range(1, len(numbers) + 1))


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=[pytest.mark.slow] * (p.name in SLOW) + [pytest.mark.distributed] * (p.name in DISTRIBUTED),
                  id=p.stem) for p in TUTORIALS],
)
def test_tutorial_runs_and_prints_what_it_shows(path, tmp_path, monkeypatch, request):
    monkeypatch.chdir(tmp_path)  # files a chapter writes land in a temporary folder
    if path.name in SLOW:  # the session's one loaded embedded model, copied, instead of 20 s of loading again
        base = request.getfixturevalue("embedded_base")
        monkeypatch.setattr(loader, "load_embedded", lambda dtype=None: copy.deepcopy(base).to(dtype or base.dtype))
    namespace = {"__name__": f"tutorial_{path.stem}"}
    for code, expected, line in steps(path.read_text()):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            try:
                exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
            except Exception as error:
                raise AssertionError(f"{path.name}:{line}: the block raised {error!r}") from error
        if expected is not None:
            assert normalize(printed.getvalue()) == normalize(expected), f"{path.name}:{line}: output differs"
