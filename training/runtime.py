"""Process set-up for training: logging, device and distributed init, AMP, RNG state, stop signals, run log."""
from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.distributed as dist

_logger = logging.getLogger("train")
LOGGER_NAMES = ("train", "ddf", "validate")


# ------------------------------------------------------------------------------------------------------ logging
class _StdoutHandler(logging.StreamHandler):
    """Writes to whatever sys.stdout is at the time (pytest swaps it between tests)."""

    def emit(self, record):
        self.stream = sys.stdout
        super().emit(record)


def setup_logging(rank: int = 0) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    for name in LOGGER_NAMES:
        lg = logging.getLogger(name)
        lg.setLevel(level)
        lg.propagate = False
        if not any(isinstance(h, _StdoutHandler) for h in lg.handlers):
            h = _StdoutHandler()
            h.setFormatter(logging.Formatter("%(message)s"))
            lg.addHandler(h)


def fmt_time(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h:d}:{m:02d}:{s:02d}"


# ---------------------------------------------------------------------------------------------- device, dist
@dataclass
class Runtime:
    device: torch.device
    distributed: bool = False
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0

    @property
    def primary(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_runtime(device: Optional[str] = None) -> Runtime:
    """Device and process group from the launcher's environment (torchrun, SLURM) via timm's
    ``init_distributed_device_so``; NCCL on CUDA, gloo on CPU."""
    from timm.utils.distributed import init_distributed_device_so
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.split(":")[0] not in ("cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu', 'cuda' or 'cuda:N', got {want!r}")
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {want}: CUDA is not available on this machine (use --device cpu)")
    if dist.is_available() and dist.is_initialized():
        return Runtime(torch.device(want if want == "cpu" else f"cuda:{os.environ.get('LOCAL_RANK', 0)}"), True,
                       dist.get_world_size(), dist.get_rank(), int(os.environ.get("LOCAL_RANK", 0)))
    r = init_distributed_device_so(device=want)
    return Runtime(torch.device(r["device"]), r["distributed"], r["world_size"], r["global_rank"], r["local_rank"])


def shutdown(rt: Runtime) -> None:
    if rt.distributed and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def determinism(deterministic: bool, device: torch.device):
    """Deterministic algorithms (and cudnn) inside the block; the previous settings are restored after it
    (train.main() is also called in-process by the tests)."""
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    try:
        if deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        elif device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        yield
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1], before[2]


# ------------------------------------------------------------------------------------------------------- AMP
def resolve_amp(device: torch.device, amp: bool, amp_dtype: str) -> Tuple[Optional[torch.dtype], str]:
    """Return (autocast dtype or None, human note). CPU autocast runs in bfloat16 (float16 is not offered there)."""
    if not amp:
        return None, "float32 (no AMP)"
    if amp_dtype not in ("float16", "bfloat16"):
        raise ValueError(f"--amp-dtype must be 'float16' or 'bfloat16', got {amp_dtype!r}")
    if device.type == "cpu":
        note = "bfloat16 autocast on CPU"
        if amp_dtype == "float16":
            note += " (--amp-dtype float16 is CUDA-only; CPU autocast uses bfloat16)"
        return torch.bfloat16, note
    dtype = torch.float16 if amp_dtype == "float16" else torch.bfloat16
    return dtype, f"{amp_dtype} autocast on {device.type}" + (" with a grad scaler" if dtype == torch.float16 else "")


def autocast_ctx(device: torch.device, dtype: Optional[torch.dtype]) -> Callable[[], contextlib.AbstractContextManager]:
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(device: torch.device, dtype: Optional[torch.dtype]):
    """A GradScaler for float16 autocast on CUDA, else None."""
    if dtype != torch.float16 or device.type != "cuda":
        return None
    return torch.amp.GradScaler("cuda")


# ------------------------------------------------------------------------------------------------------- RNG
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> Dict:
    # numpy's state is stored as plain data (name, uint32 words as an int64 tensor, pos, has_gauss, cached_gaussian), so
    # checkpoints load with torch.load(weights_only=True) and no numpy allow-list
    name, keys, pos, has_gauss, cached = np.random.get_state()
    st = {"torch": torch.get_rng_state(), "python": random.getstate(),
          "numpy": (str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, cached = st["numpy"]
    if isinstance(keys, torch.Tensor):  # plain-data form (see rng_state); older checkpoints hold the ndarray
        keys = keys.numpy().astype(np.uint32)
    np.random.set_state((name, keys, pos, has_gauss, cached))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(st["cuda"])
        except (RuntimeError, IndexError):
            _logger.warning("could not restore CUDA RNG state (different GPU count)")


def gather_rng(rt: Runtime):
    """This process's RNG state, or (distributed) the list of every rank's."""
    st = rng_state()
    if not rt.distributed:
        return st
    out = [None] * rt.world_size
    dist.all_gather_object(out, st)
    return out


def restore_rng(saved, rank: int) -> None:
    if saved is None:
        return
    if isinstance(saved, list):
        saved = saved[rank] if rank < len(saved) else saved[0]
    set_rng_state(saved)


# -------------------------------------------------------------------------------------------------- signals
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers ignore SIGINT/SIGTERM, so a signal sent to the whole process group
    (Ctrl-C, SLURM scancel, Kubernetes, torchrun's shutdown) leaves them alive until the main process has saved and
    shut them down. A signal held back since the fork (:func:`stop_signals_blocked`) is discarded here."""
    for s in _STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)


_REAPER = {"registered": False}


def _kill_daemonic_children() -> None:
    import multiprocessing

    children = [c for c in multiprocessing.active_children() if c.daemon]
    if children and hasattr(signal, "SIGCHLD"):  # torch's SIGCHLD handler would report the kill as a worker failure
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
        child.join(5)


def _reap_workers_at_exit() -> None:
    """At interpreter exit, SIGKILL the daemonic children that are still alive (DataLoader workers of an iterator
    that an exception kept alive). multiprocessing's own exit handler terminates them with SIGTERM, which the
    workers ignore (:func:`ignore_stop_signals`), and then joins them: the process hung forever after a worker's
    error (``--bad-image error`` with ``-j 2``). Registered after multiprocessing's handler, so it runs first."""
    if not _REAPER["registered"]:
        import atexit
        import multiprocessing.util  # noqa: F401  (its exit handler must be registered before ours)

        atexit.register(_kill_daemonic_children)
        _REAPER["registered"] = True


@contextlib.contextmanager
def stop_signals_blocked():
    """Hold SIGINT/SIGTERM back (not lose them) while DataLoader workers are started, i.e. around ``iter(loader)``.

    A worker inherits the blocked mask and unblocks only after ignoring both (:func:`ignore_stop_signals`), so a
    signal to the process group can no longer kill a worker that is still starting. Such a kill made one rank stop
    on its own while the others waited for it in a collective (a hang until torchrun's SIGKILL, no checkpoint). The
    main process gets a held signal when the block ends. No-op where ``pthread_sigmask`` is missing (Windows)."""
    _reap_workers_at_exit()
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class GracefulStop:
    """Turns the first SIGTERM / SIGINT into a request to stop after the current step (the caller saves
    ``last.pth.tar`` and exits); a second SIGINT interrupts at once. Distributed runs agree on the stop with an
    all-reduce at points every rank reaches together (:meth:`agree`) so that every rank stops at the same step; never
    once per step or per evaluation batch."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, rt: Runtime):
        self.rt = rt
        self.signum: Optional[int] = None
        self._old: Dict[int, object] = {}

    def __enter__(self) -> "GracefulStop":
        for s in self.SIGNALS:
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: no signal handling
                break
        return self

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        _logger.warning("received %s: saving last.pth.tar at the next sync step (every --log-interval steps, or "
                        "the end of the epoch's evaluation), then stopping",
                        signal.Signals(signum).name)

    @property
    def received(self) -> bool:
        """This process received a stop signal (no collective; other ranks may not know yet)."""
        return self.signum is not None

    def agree(self, *values: float) -> List[float]:
        """One collective (distributed): the MAX over ranks of this rank's signal number and of ``values``. A signal
        of another rank is adopted, so afterwards :attr:`signum` is the same on every rank. Every rank must call it
        at the same points of the run (the training loop: its sync steps, identical on every rank because the
        padded train sampler gives every rank the same number of batches); returns the agreed ``values``."""
        if not self.rt.distributed:
            return list(values)
        t = torch.tensor([float(self.signum or 0), *map(float, values)], dtype=torch.float64, device=self.rt.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        agreed = t.tolist()
        if agreed[0]:
            self.adopt(int(agreed[0]))
        return agreed[1:]

    def adopt(self, signum: int) -> None:
        """Take another rank's signal as this rank's stop request (this rank's own signal, if any, is kept)."""
        if self.signum is None:
            self.signum = signum

    def requested(self) -> bool:
        """True once any rank received a signal (one all-reduce when distributed: see :meth:`agree`)."""
        self.agree()
        return self.signum is not None


# -------------------------------------------------------------------------------------------------- run log
class RunLog:
    """TensorBoard scalars of the run (per step and per epoch); rank 0 only. summary.csv is part of the epoch-end
    save (:class:`training.checkpoint.CheckpointSaver`)."""

    def __init__(self, out_dir: str, tensorboard: bool = True):
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(log_dir=os.path.join(out_dir, "tensorboard"))
            except Exception as e:  # noqa: BLE001 - tensorboard missing or broken
                _logger.warning("TensorBoard logging disabled: %s", e)

    def epoch(self, row: Dict) -> None:
        if self.tb is not None:
            for k, v in row.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["epoch"])
            self.tb.flush()

    def step(self, tag: str, value: float, step: int) -> None:
        if self.tb is not None:
            self.tb.add_scalar(tag, value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
