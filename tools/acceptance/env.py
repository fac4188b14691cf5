"""Phase ``env``: the GPU (name, SMs, memory, driver), the software stack and the TF32 settings."""
from __future__ import annotations

import platform
import shutil
import subprocess

import torch

from .common import Context, result, table


def _driver() -> str:
    if not shutil.which("nvidia-smi"):
        return "n/a (no nvidia-smi)"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"n/a ({exc})"
    return out.splitlines()[0] if out else "n/a"


def _versions():
    import triton
    try:
        import timm
        timm_v = timm.__version__
    except ImportError:
        timm_v = "not installed"
    import ddf
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda (torch)": str(torch.version.cuda),
            "triton": triton.__version__, "timm": timm_v, "ddf": ddf.__version__, "ddf backends": ddf.backend_info()}


def _gpu():
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "capability": f"sm_{p.major}{p.minor}", "SMs": p.multi_processor_count,
            "memory GiB": f"{p.total_memory / 2**30:.1f}", "driver": _driver(),
            "GPUs visible": torch.cuda.device_count()}


def _tools():
    return {name: shutil.which(name) or "not on PATH" for name in ("compute-sanitizer", "ncu", "nvdisasm")}


def run(ctx: Context):
    info = {}
    if torch.cuda.is_available():
        info.update(_gpu())
    else:
        info["gpu"] = "none (torch.cuda.is_available() is False)"
    info.update(_versions())
    info["tf32 matmul / cudnn"] = (f"{torch.backends.cuda.matmul.allow_tf32} / {torch.backends.cudnn.allow_tf32}")
    info.update(_tools())
    info["cpu"] = f"{platform.machine()}, {torch.get_num_threads()} torch threads"
    rows = [[k, v] for k, v in info.items()]
    tables = [table("Environment", ["item", "value"], rows)]
    if not ctx.dry_run and not torch.cuda.is_available():
        return result("fail", "no CUDA device: run with --dry-run on a CPU machine", tables, info=info)
    return result("pass", f"{info['gpu']}; torch {torch.__version__}", tables, info=info)
