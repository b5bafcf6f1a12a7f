"""Every tutorial runs: each ```python block in order, in one namespace per chapter, and each
```output block right after a python block must equal what that block printed. The chapters are
read and run by ``tutorials/chapters.py``, which ``python -m tutorials`` uses too.
"""

import copy
import re
import subprocess
import sys

import jupytext
import pytest

from models import loader
from tutorials.chapters import FENCE, FOLDER, blocks, chapters, normalize, run_block, steps

TUTORIALS = chapters()
# Chapters that load the embedded model or its tokenizer run with the slow tests.
SLOW = {"03_targets_and_injection.md", "04_data.md", "07_a_real_model_learns.md", "08_rank_and_alpha.md",
        "09_qlora_nf4.md", "E_is_delta_w_low_rank.md", "G_qlora_in_depth.md"}
# Chapters that launch torchrun run with the distributed tests.
DISTRIBUTED = {"H_distributed.md"}
# What counts as a check in a block's code.
ASSERTS = re.compile(r"\bassert\b|assert_close\(")


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



# Every chapter but the first (what you will build) and the last numbered one (the closing page) ends
# with exercises; so does every appendix.
NUMBERED = [path for path in TUTORIALS if path.name[0].isdigit()]
TEACHING = [path for path in TUTORIALS if path not in (NUMBERED[0], NUMBERED[-1])]


@pytest.mark.parametrize("path", TEACHING, ids=lambda path: path.stem)
def test_chapter_ends_with_two_or_three_exercises_whose_folded_solutions_assert(path):
    """A "## Try it" section, each exercise's solution a python block inside <details> that asserts something."""
    text = path.read_text()
    assert "\n## Try it\n" in text, f"{path.name}: no '## Try it' section"
    exercises = text.split("\n## Try it\n", 1)[1]
    folded = re.findall(r"^<details>\n<summary>Solution</summary>\n(.*?)^</details>$", exercises, re.MULTILINE | re.DOTALL)
    assert 2 <= len(folded) <= 3, f"{path.name}: {len(folded)} folded solutions"
    assert len(folded) == exercises.count("<details>"), f"{path.name}: a <details> without <summary>Solution</summary>"
    for solution in folded:
        code = "".join(code for kind, code, _ in blocks(solution) if kind == "python")
        assert ASSERTS.search(code), f"{path.name}: a solution that asserts nothing"

# The main path's pages together; 16,000 words is the aim, this the line no page may push it past.
MAIN_PATH_WORDS = 18_000
# asserts plus checked output blocks over every page: moving a check between pages keeps it, deleting one
# is caught here.
CHECKS = 329


def test_main_path_is_at_most_18000_words_code_included():
    words = sum(len(path.read_text().split()) for path in NUMBERED)
    assert words <= MAIN_PATH_WORDS, f"the numbered pages hold {words:,} words; move depth to an appendix"


@pytest.mark.parametrize("path", [path for path in TEACHING if path in NUMBERED], ids=lambda path: path.stem)
def test_main_path_chapter_ends_with_three_to_five_key_ideas_before_its_exercises(path):
    sections = re.split(r"^## ", path.read_text(), flags=re.MULTILINE)
    headings = [section.split("\n", 1)[0] for section in sections[1:]]
    assert headings[-2:] == ["Key ideas", "Try it"], f"{path.name}: ends with {headings[-2:]}"
    bullets = [line for line in sections[-2].splitlines() if line.startswith("- ")]
    assert 3 <= len(bullets) <= 5, f"{path.name}: {len(bullets)} key ideas"


def test_asserts_and_checked_outputs_across_all_pages_do_not_fall():
    found = 0
    for path in TUTORIALS:
        for code, expected, _ in steps(path.read_text()):
            found += len(ASSERTS.findall(code)) + (expected is not None)
    assert found >= CHECKS, f"{found} checks, fewer than {CHECKS}: a moved section lost one"


def test_every_chapter_that_loads_the_embedded_model_runs_with_the_slow_tests():
    loads = re.compile(r"load_embedded\(|load_tokenizer\(|load_model\(\"smollm2")
    for path in TUTORIALS:
        code = "".join(code for code, _, _ in steps(path.read_text()))
        if loads.search(code):
            assert path.name in SLOW, f"{path.name} loads the embedded model: add it to SLOW"


def anchors(text: str) -> set[str]:
    """The anchors a Markdown page's headings get on GitHub: lower case, punctuation dropped, spaces to
    hyphens, a repeated one numbered."""
    seen, found = {}, set()
    for heading in re.findall(r"^#{1,6} (.+)$", FENCE.sub("", text), re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        found.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return found


ROOT = FOLDER.parent
PAGES = sorted(path for path in ROOT.glob("**/*.md") if not {".venv", ".git", ".pytest_cache"} & set(path.parts)
               and "egg-info" not in str(path))


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_every_relative_link_resolves_to_a_file_and_its_heading(page):
    """README, the tutorials, the other READMEs and the results' pages: each ``[text](target)`` that is
    not a web address names a file that exists, and a ``#part`` names one of its headings."""
    text = re.sub(r"`[^`\n]*`", "", FENCE.sub("", page.read_text()))
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, part = target.partition("#")
        linked = (page.parent / file).resolve() if file else page
        assert linked.exists(), f"{page.relative_to(ROOT)}: {target} names no file"
        if part and linked.suffix == ".md":
            assert part in anchors(linked.read_text()), f"{page.relative_to(ROOT)}: {target} names no heading"


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
        try:
            printed = run_block(code, namespace, f"{path.name}:{line}")
        except Exception as error:
            raise AssertionError(f"{path.name}:{line}: the block raised {error!r}") from error
        if expected is not None:
            assert normalize(printed) == normalize(expected), f"{path.name}:{line}: output differs"


@pytest.mark.parametrize("path", TUTORIALS, ids=lambda path: path.stem)
def test_chapter_opens_as_a_notebook_with_one_code_cell_per_python_block(path):
    """jupytext reads the Markdown as a notebook: each python block a code cell, the rest Markdown cells."""
    cells = [cell.source for cell in jupytext.read(path).cells if cell.cell_type == "code"]
    assert cells == [code.rstrip("\n") for code, _, _ in steps(path.read_text())]


def test_python_m_tutorials_runs_a_chapter_named_by_its_number_and_fails_on_a_wrong_output(tmp_path):
    chapter = tmp_path / "01_example.md"
    chapter.write_text("# Example\n\n```python\nprint(6 * 7)\n```\n\n```output\n42\n```\n")
    result = subprocess.run([sys.executable, "-m", "tutorials", str(chapter)], capture_output=True, text=True,
                            cwd=FOLDER.parent, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "42" in result.stdout
    chapter.write_text(chapter.read_text().replace("42\n```", "41\n```"))
    result = subprocess.run([sys.executable, "-m", "tutorials", str(chapter)], capture_output=True, text=True,
                            cwd=FOLDER.parent, timeout=60)
    assert result.returncode == 1
    assert "output differs from the chapter at 01_example.md:3" in result.stderr
