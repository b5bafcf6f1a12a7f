"""The packages import one way, lora -> data | models -> eval -> training -> benchmarks | experiments, as
setup.cfg's import-linter contract says; a wrong-way import fails the suite with its name."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

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
    assert "2 kept, 0 broken" in result.stdout


def test_a_wrong_way_import_breaks_the_contract_and_is_named(tmp_path):
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path)
    # The core knowing about the loop: the import the contract exists to catch.
    (tmp_path / "lora" / "wrong_way.py").write_text("from training.schedule import get_lr\n")
    result = lint_imports(tmp_path)
    assert result.returncode == 1
    assert "1 kept, 1 broken" in result.stdout
    assert "lora.wrong_way -> training.schedule" in result.stdout
