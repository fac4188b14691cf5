"""torchrun for ``distributed_train.sh``, with a clean stop on SIGTERM / SIGINT.

A scheduler's SIGTERM (SLURM ``scancel``, Kubernetes) or Ctrl-C reaches torchrun's agent, which forwards the signal
once to every worker (each in its own session) and waits for them (TORCH_ELASTIC_SHUTDOWN_TIMEOUT seconds, set to
120 by distributed_train.sh unless given, then SIGKILL); the workers save ``last.pth.tar`` after their
current step and exit 128+signal (:class:`training.runtime.GracefulStop`). torchrun then re-raises the signal as a
``SignalException`` with a traceback; here it becomes one line and exit status 128+signal, like a single-process
run. Everything else is ``python -m torch.distributed.run``. Imports only torch (run as ``-m training.launch``).
"""
from __future__ import annotations

import sys


def main(argv=None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main

    try:
        torchrun_main(argv)
    except SignalException as exc:
        print(f"distributed_train.sh: stopped by {exc.sigval.name}, forwarded to the workers (each saves "
              "last.pth.tar after its current step: their last log lines say where; resume with --resume)",
              file=sys.stderr, flush=True)
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:  # the failed rank printed its own 'error:' line; no second traceback here
        rank, failure = exc.get_first_failure()
        print(f"distributed_train.sh: rank {rank} failed with exit code {failure.exitcode} (its 'error:' line above "
              f"says why); the other ranks were stopped", file=sys.stderr, flush=True)
        return failure.exitcode if 0 < failure.exitcode < 256 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
