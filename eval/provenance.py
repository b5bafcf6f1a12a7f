"""Where a result came from: the command that reruns it, the date, how long it took, the machine.

Every report the repository commits under ``results/`` opens with such a line, so each number in
it leads back to a command anyone can rerun, and to the machine whose speed it reflects.
"""

import os
import platform
import subprocess
import sys
import time

import torch


def machine() -> str:
    """The CPU's model name from lscpu (or the platform's processor string), torch's thread count and version."""
    try:
        lines = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines()
        name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = platform.processor() or "unknown CPU"
    threads = torch.get_num_threads()
    return f"{name}, {threads} torch thread{'' if threads == 1 else 's'}, torch {torch.__version__}"


def rerun_command(module: str, argv: list[str] | None) -> str:
    """The command line that reruns ``module`` as it ran: ``argv`` (or the process's), with OMP_NUM_THREADS if set.

    The thread count is part of how to rerun it: on a CPU shared with other jobs, OMP_NUM_THREADS=1
    avoids threads spinning against each other (about 30x faster there than 2 threads each).
    """
    threads = f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} " if "OMP_NUM_THREADS" in os.environ else ""
    return " ".join([f"{threads}python -m {module}", *(sys.argv[1:] if argv is None else argv)])


def provenance(command: str, seconds: float) -> str:
    """One line for a report's top: ``"`command`, 2026-11-29, 21 min on <machine>."`` (the date in UTC)."""
    return f"`{command}`, {time.strftime('%Y-%m-%d', time.gmtime())}, {seconds / 60:.0f} min on {machine()}."
