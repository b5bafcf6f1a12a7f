"""The packages import one way, lora -> data | models -> eval -> training -> benchmarks | experiments, and
data takes nothing from lora but lora.atomic, as setup.cfg's import-linter contracts say; an import
that breaks either fails the suite with its name."""

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
    assert "3 kept, 0 broken" in result.stdout


def copy_with(tmp_path: Path, path: str, source: str) -> Path:
    """A copy of the packages and setup.cfg under ``tmp_path``, with one more module at ``path`` holding ``source``."""
    for package in PACKAGES:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "setup.cfg", tmp_path)
    (tmp_path / path).write_text(source)
    return tmp_path


def test_a_wrong_way_import_breaks_the_layers_contract_and_is_named(tmp_path):
    # The core knowing about the loop: the import the contract exists to catch.
    result = lint_imports(copy_with(tmp_path, "lora/wrong_way.py", "from training.schedule import get_lr\n"))
    assert result.returncode == 1
    assert "2 kept, 1 broken" in result.stdout
    assert "imports only the layers below it BROKEN" in result.stdout
    assert "lora.wrong_way -> training.schedule" in result.stdout


def test_data_importing_lora_beyond_lora_atomic_breaks_its_contract_and_is_named(tmp_path):
    # Below data in the layers, so the layers contract allows it; the forbidden contract does not.
    result = lint_imports(copy_with(tmp_path, "data/adapted.py", "from lora.inject import inject_lora\n"))
    assert result.returncode == 1
    assert "2 kept, 1 broken" in result.stdout
    assert "data imports nothing from lora but lora.atomic BROKEN" in result.stdout
    assert "data.adapted -> lora.inject" in result.stdout


def test_the_core_importing_a_variant_breaks_its_contract_and_is_named(tmp_path):
    # lora.inject may not import the 4-bit layer, though the layers contract allows it (both are lora).
    source = (ROOT / "lora" / "inject.py").read_text() + "from lora.nf4 import NF4Linear\n"
    result = lint_imports(copy_with(tmp_path, "lora/inject.py", source))
    assert result.returncode == 1
    assert "2 kept, 1 broken" in result.stdout
    assert "lora.layer and lora.inject import no variant BROKEN" in result.stdout
    assert "lora.inject -> lora.nf4" in result.stdout
