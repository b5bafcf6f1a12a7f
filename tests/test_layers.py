"""The packages import one way, lora -> data | models -> eval -> training -> benchmarks | experiments;
data takes nothing from lora but lora.atomic; lora.layer and lora.inject import no variant: as
setup.cfg's import-linter contracts say. An import that breaks one fails the suite with its name."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
PACKAGES = ("lora", "data", "models", "eval", "training", "benchmarks", "experiments")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the packages under ``root``, with ``root``'s setup.cfg."""
    command = [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
               "sys.exit(lint_imports_command())", "--no-cache", "--no-logo", str(root / "setup.cfg")]
    environment = {**os.environ, "PYTHONPATH": str(root)}  # these packages, ahead of any installed copy
    return subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True, timeout=120)


def test_packages_import_one_way():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 kept, 0 broken" in result.stdout


def copy_with(tmp_path: Path, path: str, source: str) -> Path:
    """A copy of the packages and setup.cfg under ``tmp_path``, with one more module at ``path`` holding ``source``."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path)
    (tmp_path / path).write_text(source)
    return tmp_path


INJECT = (ROOT / "lora" / "inject.py").read_text()


@pytest.mark.parametrize("path, source, contract, named", [
    # The core knowing about the loop: the import the layers contract exists to catch.
    ("lora/wrong_way.py", "from training.schedule import get_lr\n", "imports only the layers below it",
     "lora.wrong_way -> training.schedule"),
    # Below data in the layers, so the layers contract allows it; data's forbidden contract does not.
    ("data/adapted.py", "from lora.inject import inject_lora\n", "data imports nothing from lora but lora.atomic",
     "data.adapted -> lora.inject"),
    # Both in lora, so the layers contract allows it; the core's forbidden contract does not.
    ("lora/inject.py", INJECT + "from lora.nf4 import NF4Linear\n", "lora.layer and lora.inject import no variant",
     "lora.inject -> lora.nf4"),
], ids=["layers", "data-uses-only-lora-atomic", "core"])
def test_an_import_a_contract_forbids_breaks_that_contract_and_is_named(tmp_path, path, source, contract, named):
    result = lint_imports(copy_with(tmp_path, path, source))
    assert result.returncode == 1
    assert "2 kept, 1 broken" in result.stdout
    assert f"{contract} BROKEN" in result.stdout
    assert named in result.stdout
