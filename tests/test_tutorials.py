"""Every tutorial runs: each ```python block in order, in one namespace per chapter, and each
```output block right after a python block must equal what that block printed.

Run as a script, it runs one chapter in a temporary folder, says how long each block took, and
copies the pictures the chapter drew (its ``figures/``) to ``--figures``: that is how the
pictures committed under ``tutorials/figures/`` were made.

    python tests/test_tutorials.py tutorials/07_a_real_model_learns.md --figures tutorials/figures
"""

import argparse
import contextlib
import copy
import io
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import pytest

from models import loader

FOLDER = Path(__file__).parent.parent / "tutorials"
# Chapters 00, 01, ... in reading order, then the appendices A_, B_, ...
TUTORIALS = sorted(FOLDER.glob("[0-9][0-9]_*.md")) + sorted(FOLDER.glob("[A-Z]_*.md"))
# Chapters that load the embedded model or its tokenizer run with the slow tests.
SLOW = {"03_targets_and_injection.md", "04_data.md", "07_a_real_model_learns.md", "08_rank_and_alpha.md",
        "09_is_delta_w_low_rank.md"}
# Chapters that launch torchrun run with the distributed tests.
DISTRIBUTED = {"11_distributed.md"}
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


def test_chapters_are_numbered_from_0_and_appendices_lettered_from_a_without_gaps():
    numbers = [int(path.name[:2]) for path in TUTORIALS if path.name[0].isdigit()]
    letters = [path.name[0] for path in TUTORIALS if path.name[0].isalpha()]
    assert numbers == list(range(len(numbers)))
    assert letters == [chr(ord("A") + i) for i in range(len(letters))]


def test_chapters_refer_to_each_other_by_title_not_number():
    """Chapters slot in between others, so a "chapter 6" in the prose would point at the wrong one."""
    for path in TUTORIALS:
        for number, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.search(r"\b[Cc]hapter \d", line), f"{path.name}:{number}: name the chapter by its title"



def test_chapter_0_lists_every_chapter_in_order_by_its_title():
    """The one table of contents: each chapter and appendix linked once, in file order, named by its title."""
    contents = TUTORIALS[0].read_text()
    links = re.findall(r"\[([^\]]+)\]\(([0-9A-Z][0-9]?_[a-z0-9_]+\.md)\)", contents.split("## The chapters", 1)[1])
    listed = list(dict.fromkeys(name for _, name in links))
    assert listed == [path.name for path in TUTORIALS[1:]]
    for title, name in links:
        heading = (FOLDER / name).read_text().splitlines()[0].removeprefix("# ").removeprefix("Appendix: ")
        assert heading.startswith(title), f"{name}: linked as {title!r}, titled {heading!r}"

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


def run_chapter(path: Path, figures: Path | None) -> None:
    """Run every block of the chapter at ``path`` in a temporary folder, printing what each printed and its time;
    copy the chapter's figures/ to ``figures``."""
    namespace = {"__name__": f"tutorial_{path.stem}"}
    text, start = path.read_text(), time.perf_counter()
    with tempfile.TemporaryDirectory() as folder:
        os.chdir(folder)
        for code, _, line in steps(text):
            began = time.perf_counter()
            print(f"--- {path.name}:{line}", flush=True)
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
            print(f"--- {time.perf_counter() - began:.1f} s", flush=True)
        if figures is not None:
            figures.mkdir(parents=True, exist_ok=True)
            for picture in sorted(Path("figures").glob("*.png")):
                shutil.copy(picture, figures / picture.name)
                print(f"wrote {figures / picture.name}")
    print(f"{path.name}: {time.perf_counter() - start:.1f} s in all")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="Run one tutorial chapter, timing each block.")
    parser.add_argument("chapter", type=Path)
    parser.add_argument("--figures", type=Path, help="copy the chapter's figures/*.png here")
    args = parser.parse_args()
    run_chapter(args.chapter.resolve(), args.figures.resolve() if args.figures else None)
