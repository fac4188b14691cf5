"""Launchers of the Triton DDF kernels: output allocation (the op's layout rule), grids, block sizes.

On a GPU the forward and grad_input kernels launch with one config per (k, dtype), :func:`tile_config`: a
deterministic choice, the same on every rank and run, with no benchmark (nothing synchronises inside a CUDA-graph
capture), and the config that the AOT check compiles for each variant. ``DDF_TRITON_AUTOTUNE=1`` opts in to Triton's
autotuner over :func:`tile_configs` (``key``: channels per head, output size, k, dtype; the first call per shape
compiles and times every config), except where that could hurt a run (:func:`autotune_wanted`). Under Triton's
interpreter (CPU tensors) one large-block config runs, because the interpreter's cost grows with the number of
program instances. Pass 1 of the backward uses fixed block sizes and warps (:func:`gpu_filters_blocks`)
(its grad_channel partial buffer is sized by the pixel block). Kernels are launched through ``wrap_triton`` so that
``torch.compile`` sees them inside the op; under the interpreter they are called directly (see :func:`_launcher`).
Triton launches on the *current* CUDA device and stream, so every launch (:func:`_launch`) is made inside
:func:`device_guard` (the tensors' device).
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
from torch._subclasses.fake_tensor import is_fake
from torch.library import wrap_triton

from ... import _checks
from ...reference import spatial_filter_norm
from .kernels import ddf_bwd_filters_kernel, ddf_bwd_input_kernel, ddf_fwd_kernel

__all__ = ["forward", "backward", "INTERPRET", "tile_configs", "tile_config", "autotune_wanted", "interpreter_config",
           "filters_config", "device_guard", "AUTOTUNE_ENV"]

#: triton.jit read TRITON_INTERPRET when the kernels were decorated (import time of .kernels)
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE_ENV = "DDF_TRITON_AUTOTUNE"
#: elements of a [BLOCK_C, KK_PAD, BLOCK_P] tile per *warp* (8 a thread) in the forward / grad_input kernels on a
#: GPU, half that in fp64; backward pass 1 has its own share of it (:func:`gpu_filters_blocks`). At this budget every
#: variant that compile_check compiles by default fits <= 128 registers a thread with no spills on sm_75/80/90 with
#: triton 3.6 and 3.8; at twice it (2048 elements at 4 warps) triton 3.6 needed 153 registers, and at the budget
#: before (1024 a warp) up to 255, with spills.
_TILE_BUDGET = 256


def tile_configs():
    """The autotune configs of the forward / grad_input kernels (pruned per k by :func:`_prune`), in the order of
    preference of :func:`tile_config`, whose first fitting config is C2xP32xCB8 w4 for k=1 and fp32/fp16/bf16 k=3 (16
    channels a program: one spatial-tile read per 16 channels of a head), C1xP32xCB16 w4 for fp64 k=3 and fp32 k=5,
    C1xP32xCB32 w8 for fp64 k=5 and fp32 k=7, C1xP16xCB32 w8 for fp64 k=7. Every config fits the budget at k=3 in
    fp32 (all are autotune candidates there, and the AOT check compiles them all)."""
    configs = []
    for block_c, block_p, cb, warps in ((2, 32, 8, 4), (1, 64, 16, 4), (4, 32, 4, 8), (2, 64, 4, 8), (1, 32, 16, 4),
                                        (1, 32, 32, 8), (1, 16, 32, 8), (1, 32, 32, 2)):
        configs.append(triton.Config({"BLOCK_C": block_c, "BLOCK_P": block_p, "CB": cb}, num_warps=warps))
    return configs


def _fits(config, kk_pad: int, f64: bool) -> bool:
    """A config's [BLOCK_C, KK_PAD, BLOCK_P] tile fits the register budget (:data:`_TILE_BUDGET` elements per warp;
    half in fp64)."""
    tile = config.kwargs["BLOCK_C"] * kk_pad * config.kwargs["BLOCK_P"]
    return tile <= _TILE_BUDGET * config.num_warps // (2 if f64 else 1)


def _prune(configs, named_args, **kwargs):
    kept = [c for c in configs if _fits(c, kwargs["KK_PAD"], kwargs["ACC_F64"])]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_C"] * c.kwargs["BLOCK_P"])]


_KEY = ["Cg", "Ho", "Wo", "K", "ACC_F64", "MUL", "STRIDE"]
_tuners = {}
_fixed_tuners = {}


def _tuned(plain):
    """The autotuned form of a forward-style kernel, made on first use (never at import: before triton 3.3 an
    ``Autotuner`` asks for the active GPU driver when it is made, which fails on a machine without one)."""
    if plain not in _tuners:
        _tuners[plain] = triton.autotune(tile_configs(), key=_KEY, prune_configs_by={"early_config_prune": _prune})(
            plain)
    return _tuners[plain]


def tile_config(kk_pad: int, f64: bool):
    """The GPU config of the forward / grad_input kernels unless autotuning is wanted: the first of
    :func:`tile_configs` that fits the register budget (compile_check's default variant of each dtype x layout)."""
    return _prune(tile_configs(), {}, KK_PAD=kk_pad, ACC_F64=f64)[0]


def _fixed(plain, kk_pad: int, f64: bool):
    """``plain`` as a one-config autotuner with :func:`tile_config` (Triton runs a single config unbenchmarked):
    the same path through ``wrap_triton`` and inductor as the autotuned launch, ``num_warps`` included."""
    key = (plain.fn.__name__, kk_pad, f64)
    if key not in _fixed_tuners:
        _fixed_tuners[key] = triton.autotune([tile_config(kk_pad, f64)], key=[])(plain)
    return _fixed_tuners[key]


def autotune_wanted(tensor) -> bool:
    """``DDF_TRITON_AUTOTUNE=1`` (default 0), but never under ``torch.use_deterministic_algorithms`` (``train.py
    --deterministic``), in a multi-process run (ranks could pick different configs: different reduction orders) or
    while the current stream captures a CUDA graph (the benchmark synchronises): :func:`tile_config` runs there."""
    value = os.environ.get(AUTOTUNE_ENV, "0")
    if value not in ("0", "1", ""):
        raise ValueError(f"{AUTOTUNE_ENV} must be 0 or 1, got {value!r}")
    if value != "1" or torch.are_deterministic_algorithms_enabled():
        return False
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return False
    real_cuda = tensor.device.type == "cuda" and not is_fake(tensor)
    return not (real_cuda and torch.cuda.is_current_stream_capturing())


def interpreter_config(channels: int, pixels: int, kk_pad: int) -> dict:
    """One large block (few program instances) for Triton's interpreter."""
    block_c = min(triton.next_power_of_2(max(channels, 1)), 16)
    block_p = min(triton.next_power_of_2(max(pixels, 1)), max(16, 4096 // kk_pad))
    return {"BLOCK_C": block_c, "BLOCK_P": block_p, "CB": triton.cdiv(max(channels, 1), block_c)}


def gpu_filters_blocks(kk_pad: int, f64: bool):
    """(BLOCK_C, BLOCK_P, num_warps) of backward pass 1 on a GPU: it keeps more tiles live than the forward, so its
    tile budget per warp is half the forward's, and a quarter of that in fp64 (at half, triton 3.8's ptxas spilled
    16 bytes in fp64 NCHW add + FilterNorm on sm_80 with 8 warps). BLOCK_P stays 32 (the grad_channel partial buffer
    grows as 1/BLOCK_P); a tile over the budget of 4 warps (fp64, k >= 5) gets more warps instead, up to 32
    (<= 128 registers and no spills at k=3 on sm_75/80/90 with triton 3.6 and 3.8, see compile_check)."""
    block_p = 32
    per_warp = _TILE_BUDGET // (8 if f64 else 2)
    block_c = max(1, min(8, 4 * per_warp // (kk_pad * block_p)))
    warps = min(32, max(4, triton.next_power_of_2(triton.cdiv(block_c * kk_pad * block_p, per_warp))))
    if kk_pad >= 32:  # k >= 5: ptxas spilled at 8-16 warps (fp32/fp16/bf16) and at 32 (fp64 FilterNorm k=7) with
        warps = 16 if f64 else 32  # triton 3.8 (`grad_check.py --compile-only --all`); these counts did not
    return block_c, block_p, warps


def filters_config(kk_pad: int, f64: bool, channels: int, pixels: int) -> dict:
    """Launch parameters of backward pass 1 (fixed: the grad_channel partial buffer depends on BLOCK_P)."""
    if INTERPRET:
        cfg = interpreter_config(channels, pixels, kk_pad)
        return {"BLOCK_C": cfg["BLOCK_C"], "BLOCK_P": cfg["BLOCK_P"]}
    block_c, block_p, warps = gpu_filters_blocks(kk_pad, f64)
    return {"BLOCK_C": block_c, "BLOCK_P": block_p, "num_warps": warps}


def _meta(input, kernel_size, combine):
    return dict(K=kernel_size, KK_PAD=triton.next_power_of_2(kernel_size * kernel_size), MUL=combine == 0,
                ACC_F64=input.dtype == torch.float64)


def device_guard(tensor):
    """``torch.cuda.device(tensor.device)`` for a real CUDA tensor (a ``cuda:1`` input launches on device 1 while
    the current device is 0); a no-op for CPU tensors (the interpreter) and for fake tensors (tracing launches
    nothing, and a machine without a GPU must still trace)."""
    if tensor.device.type != "cuda" or is_fake(tensor):
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def _launcher(kernel):
    """``wrap_triton(kernel)`` on a GPU; the kernel itself under Triton's interpreter, where the launchers already run
    inside opaque ops (see ``__init__``) and the interpreter's kernel objects differ across triton versions (triton
    3.6's ``InterpretedFunction`` is no ``JITFunction``, which torch 2.11's ``wrap_triton`` rejects)."""
    return kernel if INTERPRET else wrap_triton(kernel)


def _launch(kernel, grid, args, kwargs):
    """Every kernel launch: on the device of the first tensor argument (see :func:`device_guard`)."""
    with device_guard(args[0]):
        _launcher(kernel)[grid](*args, **kwargs)


def _launch_tiled(plain, grid_pixels, bh, channels, kk_pad, args, meta):
    """Launch a forward-style kernel: :func:`tile_config` (or autotuned) on a GPU, one interpreter-sized config on
    CPU."""
    if INTERPRET:
        cfg = interpreter_config(channels, grid_pixels, kk_pad)
        grid = (triton.cdiv(grid_pixels, cfg["BLOCK_P"]), bh, triton.cdiv(channels, cfg["BLOCK_C"] * cfg["CB"]))
        _launch(plain, grid, args, dict(meta, **cfg))
    else:
        def grid(m):
            return (triton.cdiv(grid_pixels, m["BLOCK_P"]), bh, triton.cdiv(channels, m["BLOCK_C"] * m["CB"]))

        kernel = _tuned(plain) if autotune_wanted(args[0]) else _fixed(plain, kk_pad, meta["ACC_F64"])
        _launch(kernel, grid, args, meta)


def forward(input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine, spatial_norm,
            spatial_gain):
    out = _checks.empty_forward_output(input, stride)
    if out.numel() == 0:
        return out
    B, C, H, W = input.shape
    Ho, Wo = out.shape[2:]
    meta = dict(_meta(input, kernel_size, combine), NORM=bool(spatial_norm))
    args = (input, channel_filter, spatial_filter, out, H, W, Ho, Wo, C // head, head, dilation, stride,
            float(spatial_gain), *input.stride(), *channel_filter.stride(), *spatial_filter.stride(), *out.stride())
    _launch_tiled(ddf_fwd_kernel, Ho * Wo, B * head, C // head, meta["KK_PAD"], args, meta)
    return out


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _filters_pass(grad_output, input, channel_filter, spatial_filter, gsp, kernel_size, dilation, stride, head,
                  combine, spatial_norm, spatial_gain):
    """Backward pass 1: grad_spatial (written into gsp) and grad_channel (returned, reduced in a fixed order)."""
    B, C, H, W = input.shape
    Ho, Wo = grad_output.shape[2:]
    meta = dict(_meta(input, kernel_size, combine), NORM=bool(spatial_norm))
    cfg = filters_config(meta["KK_PAD"], meta["ACC_F64"], C // head, Ho * Wo)
    n_pb = triton.cdiv(Ho * Wo, cfg["BLOCK_P"])
    part = torch.empty((n_pb, B, C, kernel_size * kernel_size), dtype=_acc_dtype(input.dtype), device=input.device)
    args = (grad_output, input, channel_filter, spatial_filter, gsp, part, C, H, W, Ho, Wo, C // head, head,
            dilation, stride, float(spatial_gain), *grad_output.stride(), *input.stride(), *channel_filter.stride(),
            *spatial_filter.stride(), *gsp.stride(), B)
    _launch(ddf_bwd_filters_kernel, (n_pb, B * head), args, dict(meta, **cfg))
    return part.sum(dim=0).reshape(B, C, kernel_size, kernel_size).to(input.dtype)


def backward(grad_output, input, channel_filter, spatial_filter, kernel_size, dilation, stride, head, combine,
             spatial_norm, spatial_gain):
    gin, gch, gsp = _checks.empty_backward_outputs(input, channel_filter, spatial_filter)
    if input.numel() == 0 or grad_output.numel() == 0:
        return gin.zero_(), gch.zero_(), gsp.zero_()
    gch = _filters_pass(grad_output, input, channel_filter, spatial_filter, gsp, kernel_size, dilation, stride,
                        head, combine, spatial_norm, spatial_gain)
    sp = spatial_filter
    if spatial_norm:  # pass 2 gathers taps of several output pixels: give it the normalised filter
        sp = spatial_filter_norm(spatial_filter.to(_acc_dtype(input.dtype)), head, kernel_size, spatial_gain)
    B, C, H, W = input.shape
    Ho, Wo = grad_output.shape[2:]
    meta = _meta(input, kernel_size, combine)
    args = (grad_output, channel_filter, sp, gin, H, W, Ho, Wo, C // head, head, dilation, stride,
            *grad_output.stride(), *channel_filter.stride(), *sp.stride(), *gin.stride())
    _launch_tiled(ddf_bwd_input_kernel, H * W, B * head, C // head, meta["KK_PAD"], args, meta)
    return gin, gch, gsp
