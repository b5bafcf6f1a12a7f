"""Run one chapter in a terminal: each python block in order, printing its output and its time.

    python -m tutorials 04                 # or: data, 04_data, tutorials/04_data.md
    python -m tutorials --list
    python -m tutorials 07 --figures tutorials/figures

It runs in a fresh temporary folder, so what a chapter writes (runs, adapters, figures) never lands
in the repository; ``--figures`` copies the pictures it drew. It exits 1 when a block printed
something other than the chapter's ``output`` block.
"""

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tutorials import chapters


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tutorials", description=__doc__.split("\n\n")[0])
    parser.add_argument("chapter", nargs="?", help="a number (04), a letter (A), a name (data) or a path")
    parser.add_argument("--list", action="store_true", help="list the chapters in reading order and exit")
    parser.add_argument("--figures", type=Path, help="copy the pictures the chapter drew (its figures/*.png) here")
    args = parser.parse_args(argv)
    if args.list or args.chapter is None:
        for path in chapters.chapters():
            print(f"{path.stem.split('_', 1)[0]:>3}  {chapters.title(path)}")
        return 0
    try:
        path = chapters.find(args.chapter)
    except ValueError as error:
        parser.error(str(error))
    figures = args.figures.resolve() if args.figures else None
    here = Path.cwd()
    with tempfile.TemporaryDirectory(prefix=f"tutorial_{path.stem}_") as folder:
        os.chdir(folder)
        try:
            differs = chapters.run(path)
            if figures is not None:
                figures.mkdir(parents=True, exist_ok=True)
                for picture in sorted(Path("figures").glob("*.png")):
                    shutil.copy(picture, figures / picture.name)
                    print(f"wrote {figures / picture.name}")
        finally:
            os.chdir(here)
    if differs:
        print("output differs from the chapter at " + ", ".join(differs), file=sys.stderr)
    return 1 if differs else 0


if __name__ == "__main__":
    sys.exit(main())
