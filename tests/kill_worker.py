"""The training CLI with one rank killed mid-run: torchrun runs it in place of ``-m training.loop``.

    python -m torch.distributed.run --standalone --nproc-per-node 2 --max-restarts 1 \\
        tests/kill_worker.py RANK:STEP [the arguments of python -m training.loop]

Rank RANK SIGKILLs itself once STEP optimizer steps are done (after that step's validation and
checkpoint, before the next step begins), in torchrun's first attempt only, so that torchrun
restarts the group and the run resumes from its newest checkpoint, as it would after a real crash.
The loop asks the module global ``training.loop.get_lr`` for every step's learning rate, with the
number of steps already taken, first thing in the step: wrapping it finds the moment, and the
library carries no code that exists only to be killed.
"""

import os
import signal
import sys

from training import distributed, loop


def get_lr_or_die(rank: int, steps: int, get_lr):
    """``get_lr``, except that rank ``rank`` of the first attempt dies when asked for the step after ``steps``."""

    def wrapped(steps_taken: int, *args, **kwargs) -> float:
        if steps_taken == steps and int(os.environ["RANK"]) == rank and not distributed.restarted():
            os.kill(os.getpid(), signal.SIGKILL)
        return get_lr(steps_taken, *args, **kwargs)

    return wrapped


def main(argv: list[str]) -> int:
    rank, steps = (int(part) for part in argv[0].split(":"))
    loop.get_lr = get_lr_or_die(rank, steps, loop.get_lr)
    return loop.main(argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
