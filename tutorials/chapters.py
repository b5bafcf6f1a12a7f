"""Reading and running a chapter: its fenced blocks, the python ones in order, in one namespace.

The tests (``tests/test_tutorials.py``) and the terminal runner (``python -m tutorials``) share
these functions, so a chapter runs the same way in both.
"""

import contextlib
import io
import re
import time
from pathlib import Path

FOLDER = Path(__file__).parent
FENCE = re.compile(r"^```(\w*)\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def chapters() -> list[Path]:
    """The chapters in reading order: ``00_`` to the last number, then the appendices ``A_``, ``B_``..."""
    return sorted(FOLDER.glob("[0-9][0-9]_*.md")) + sorted(FOLDER.glob("[A-Z]_*.md"))


def find(name: str) -> Path:
    """The chapter that ``name`` denotes: a path, a file name, a stem, its number (``4``, ``04``), its letter
    (``A``) or the part after the number (``data``). Raises ValueError listing the chapters when none or
    several match."""
    if Path(name).is_file():
        return Path(name).resolve()
    key = name.removesuffix(".md").lower()
    found = [path for path in chapters()
             if key in (path.stem.lower(), path.stem.split("_", 1)[0].lower(), path.stem.split("_", 1)[1])
             or (key.isdigit() and path.stem[:2].isdigit() and int(key) == int(path.stem[:2]))]
    if len(found) != 1:
        listing = ", ".join(path.stem for path in chapters())
        raise ValueError(f"{'no chapter matches' if not found else 'several chapters match'} {name!r}; "
                         f"give a number, a letter or a name from: {listing}")
    return found[0]


def title(path: Path) -> str:
    """The chapter's H1, without the ``# ``."""
    return path.read_text().splitlines()[0].removeprefix("# ")


def blocks(text: str):
    """``(kind, code, line)`` for each fenced block: kind is the info string, line where it starts."""
    for match in FENCE.finditer(text):
        yield match.group(1), match.group(2), text.count("\n", 0, match.start()) + 1


def steps(text: str):
    """``(code, expected output or None, line)`` for each python block."""
    found = list(blocks(text))
    for index, (kind, code, line) in enumerate(found):
        if kind == "python":
            following = found[index + 1] if index + 1 < len(found) else None
            expected = following[1] if following and following[0] == "output" else None
            yield code, expected, line


def normalize(text: str) -> str:
    """Output as compared: no trailing spaces on a line, no blank lines at either end."""
    return "\n".join(line.rstrip() for line in text.strip("\n").splitlines())


def run_block(code: str, namespace: dict, where: str) -> str:
    """Run one block in ``namespace`` and return what it printed; ``where`` (``file:line``) names it in
    tracebacks."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, where, "exec"), namespace)
    return printed.getvalue()


def run(path: Path, echo: bool = True) -> list[str]:
    """Run every python block of the chapter at ``path`` in the current folder, in order, in one namespace.

    With ``echo``, print each block's line, what it printed and its time as it goes. Returns the places
    (``file:line``) whose output differs from the chapter's ``output`` block."""
    namespace, differs, start = {"__name__": f"tutorial_{path.stem}"}, [], time.perf_counter()
    for code, expected, line in steps(path.read_text()):
        where, began = f"{path.name}:{line}", time.perf_counter()
        if echo:
            print(f"--- {where}", flush=True)
        printed = run_block(code, namespace, where)
        if echo:
            print(printed, end="", flush=True)
        if expected is not None and normalize(printed) != normalize(expected):
            differs.append(where)
            if echo:
                print(f"--- differs from the chapter's output block:\n{expected}", end="")
        if echo:
            print(f"--- {time.perf_counter() - began:.1f} s", flush=True)
    if echo:
        print(f"{path.name}: {time.perf_counter() - start:.1f} s in all")
    return differs
