"""Compile the Triton DDF kernels ahead of time for NVIDIA architectures, with no GPU, and report resources.

Each variant the op can launch (kernel x dtype x layout x combine x fused FilterNorm x block config x k) is
compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))``; the PTX is then assembled
by the ``ptxas`` that ships with Triton (``ptxas -v``), which reports registers, spill stores/loads and
shared memory. Layouts are compiled as the JIT specialises them: the unit stride of a contiguous tensor (x) or of
a channels_last one (c) is a compile-time 1.

A variant fails the check on a compile error, any spill, or more than :data:`MAX_REGISTERS` registers a thread.
Next to each variant the table writes its resident warps per SM (:func:`resident_warps`), an occupancy *model*,
not a measurement: registers are allocated per warp in units of 8 a thread, so a program of ``num_warps`` warps
needs ``ceil(regs / 8) * 8 * 32 * num_warps`` of the SM's 65536 registers; the SM holds
``min(max_blocks, floor(max_warps / num_warps), floor(65536 / (ceil(regs / 8) * 8 * 32 * num_warps)),
floor(smem_per_SM / shared))`` programs (the last term only for ``shared > 0``) and thus that many times
``num_warps`` warps. Limits per SM (:data:`SM_LIMITS`): sm_90 64 warps, 32 blocks, 228 KB shared memory; sm_80
64 warps, 32 blocks, 164 KB; sm_75 32 warps, 16 blocks, 64 KB. Not modelled: the 1 KB of shared memory the driver
reserves per block, the shared-memory carve-out (L1 vs shared) the driver picks, and per-block register limits.

Used by ``python grad_check.py --compile-only [--arch sm_75,sm_80,sm_90] [--all]``.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import re
import subprocess
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import Dict, List, Optional

import triton

from . import kernels
from .launch import _prune, gpu_filters_blocks, tile_configs

__all__ = ["Variant", "variants", "compile_variant", "run", "format_table", "resident_warps", "failures",
           "MAX_REGISTERS", "SM_LIMITS"]

#: registers a thread above which a variant fails the check (>= 16 resident warps per SM on sm_80/sm_90)
MAX_REGISTERS = 128
#: per SM: (max resident warps, max resident blocks, shared memory in bytes), see the module docstring
SM_LIMITS = {75: (32, 16, 64 * 1024), 80: (64, 32, 164 * 1024), 86: (48, 16, 100 * 1024), 89: (48, 24, 100 * 1024),
             90: (64, 32, 228 * 1024)}
_REGS_PER_SM = 65536

_DTYPES = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp64": "fp64"}
_KERNELS = {"fwd": kernels.ddf_fwd_kernel, "bwd_filters": kernels.ddf_bwd_filters_kernel,
            "bwd_input": kernels.ddf_bwd_input_kernel}
# per kernel: which stride arguments are 1 in each layout (x, out, spatial filter, grad tensors; ch contiguous)
_UNIT = {
    "fwd": {"nchw": ("sxw", "sow", "ssw", "scl"), "nhwc": ("sxc", "soc", "ssc", "scl")},
    "bwd_filters": {"nchw": ("sgw", "sxw", "ssw", "stw", "scl"), "nhwc": ("sgc", "sxc", "ssc", "stc", "scl")},
    "bwd_input": {"nchw": ("sgw", "ssw", "snw", "scl"), "nhwc": ("sgc", "ssc", "snc", "scl")},
}


@dataclasses.dataclass(frozen=True)
class Variant:
    kernel: str
    dtype: str
    layout: str
    mul: bool
    norm: bool
    k: int
    block_c: int
    block_p: int
    cb: int
    num_warps: int

    def label(self) -> str:
        return (f"{self.dtype} {self.layout} {'mul' if self.mul else 'add'}{' norm' if self.norm else ''} k={self.k} "
                f"C{self.block_c}xP{self.block_p}{f'xCB{self.cb}' if self.kernel != 'bwd_filters' else ''} "
                f"w{self.num_warps}")


def _configs(kernel: str, k: int, f64: bool, all_configs: bool):
    kk_pad = triton.next_power_of_2(k * k)
    if kernel == "bwd_filters":
        block_c, block_p, warps = gpu_filters_blocks(kk_pad, f64)  # what launch.filters_config launches
        return [(block_c, block_p, 1, warps)]
    kept = _prune(tile_configs(), {}, KK_PAD=kk_pad, ACC_F64=f64)  # the launcher's pruning: [0] is tile_config
    out = [(c.kwargs["BLOCK_C"], c.kwargs["BLOCK_P"], c.kwargs["CB"], c.num_warps) for c in kept]
    return out if all_configs else out[:1]


def variants(all_variants: bool = False) -> List[Variant]:
    """Default: every kernel x dtype x layout x combine x norm at k=3 with its first config, plus every autotune
    config (fp32, contiguous, mul) of each kernel; ``all_variants``: everything for k = 1, 3, 5, 7."""
    out = []
    ks = (1, 3, 5, 7) if all_variants else (3,)
    for kernel, dtype, layout, mul, norm, k in itertools.product(_KERNELS, _DTYPES, ("nchw", "nhwc"), (True, False),
                                                                 (False, True), ks):
        if norm and (kernel == "bwd_input" or k == 1):
            continue  # grad_input gets the normalised filter; FilterNorm needs k >= 3
        for block_c, block_p, cb, warps in _configs(kernel, k, dtype == "fp64", all_variants):
            out.append(Variant(kernel, dtype, layout, mul, norm, k, block_c, block_p, cb, warps))
    if not all_variants:
        for kernel in ("fwd", "bwd_input"):
            for block_c, block_p, cb, warps in _configs(kernel, 3, False, True)[1:]:
                out.append(Variant(kernel, "fp32", "nchw", True, False, 3, block_c, block_p, cb, warps))
    return out


def _signature(v: Variant):
    fn = _KERNELS[v.kernel]
    acc = "fp64" if v.dtype == "fp64" else "fp32"
    sig, const = {}, {}
    typed = {p.name: p.annotation_type for p in fn.params}  # e.g. gain: tl.float64, typed so by the JIT too
    for name in fn.arg_names:
        if name.endswith("_ptr"):
            sig[name] = "*" + (acc if name == "gch_part_ptr" or (v.kernel == "bwd_input" and name == "sp_ptr"
                                                                and v.norm) else v.dtype)
        elif typed.get(name):
            sig[name] = typed[name]
        else:
            sig[name] = "i32"
    const.update(K=v.k, KK_PAD=triton.next_power_of_2(v.k * v.k), MUL=v.mul, ACC_F64=v.dtype == "fp64",
                 BLOCK_C=v.block_c, BLOCK_P=v.block_p)
    if v.kernel != "bwd_input":
        const["NORM"] = v.norm
    if v.kernel != "bwd_filters":
        const["CB"] = v.cb
    for name in _UNIT[v.kernel][v.layout]:
        const[name] = 1
    for name in const:
        sig[name] = "constexpr"
    return fn, sig, {(fn.arg_names.index(n),): val for n, val in const.items()}


def _ptxas_report(ptx: str, arch: int) -> Dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch)
    ptxas = getattr(ptxas, "path", ptxas)
    gpu_name = re.search(r"\.target (\S+)", ptx).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas, "-v", f"--gpu-name={gpu_name}", path, "-o", os.devnull],
                             capture_output=True, text=True, check=True)
    text = res.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = [int(x) for x in re.findall(r"(\d+) bytes spill (?:stores|loads)", text)]
    return {"registers": int(regs.group(1)) if regs else -1, "spills": sum(spills)}


def compile_variant(args) -> dict:
    """Compile one (variant, arch); returns a table row (``error`` set on failure)."""
    v, arch = args
    row = {"kernel": v.kernel, "variant": v.label(), "arch": f"sm_{arch}"}
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        fn, sig, const = _signature(v)
        compiled = triton.compile(ASTSource(fn, sig, const), target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": v.num_warps})
        row.update(_ptxas_report(compiled.asm["ptx"], arch), shared=int(compiled.metadata.shared), error="")
        row["warps_per_sm"] = resident_warps(arch, row["registers"], v.num_warps, row["shared"])
    except Exception as exc:  # a compile error is a result to report, not a crash of the whole table
        row.update(registers=-1, spills=-1, shared=-1, warps_per_sm=None,
                   error=f"{type(exc).__name__}: {str(exc)[:300]}")
    return row


def resident_warps(arch: int, registers: int, num_warps: int, shared: int) -> Optional[int]:
    """Resident warps per SM of a program (model in the module docstring); None for an arch not in SM_LIMITS."""
    if arch not in SM_LIMITS or registers <= 0:
        return None
    max_warps, max_blocks, smem = SM_LIMITS[arch]
    regs_per_block = -(-registers // 8) * 8 * 32 * num_warps
    blocks = min(max_blocks, max_warps // num_warps, _REGS_PER_SM // regs_per_block)
    if shared > 0:
        blocks = min(blocks, smem // shared)
    return blocks * num_warps


def failures(row: dict) -> List[str]:
    """Why a table row fails the check (empty: it passes): compile error, spills, registers over MAX_REGISTERS."""
    if row["error"]:
        return ["compile error"]
    out = []
    if row["spills"] > 0:
        out.append(f"{row['spills']} bytes spilled")
    if row["registers"] > MAX_REGISTERS:
        out.append(f"{row['registers']} > {MAX_REGISTERS} registers")
    return out


def parse_archs(text: str) -> List[int]:
    archs = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*sm_(\d+)a?\s*", item)
        if not m:
            raise ValueError(f"--arch takes a comma-separated list like sm_75,sm_80,sm_90; got {item!r}")
        archs.append(int(m.group(1)))
    return archs


def run(archs: List[int], all_variants: bool = False, workers: Optional[int] = None) -> List[dict]:
    jobs = [(v, a) for v in variants(all_variants) for a in archs]
    workers = workers or min(len(jobs), os.cpu_count() or 1)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_variant, jobs, chunksize=4))


def format_table(rows: List[dict]) -> str:
    lines = [f"{'kernel':<12} {'variant':<44} {'arch':<6} {'regs':>5} {'spills':>6} {'smem':>6} {'warps/SM':>8}  "
             "error / failure"]
    for r in rows:
        warps = "?" if r.get("warps_per_sm") is None else r["warps_per_sm"]
        note = r["error"] or "; ".join(failures(r))
        lines.append(f"{r['kernel']:<12} {r['variant']:<44} {r['arch']:<6} {r['registers']:>5} {r['spills']:>6} "
                     f"{r['shared']:>6} {warps:>8}  {note}")
    return "\n".join(lines)
