"""Triton kernels of the DDF op (forward; backward in two passes).

Every kernel works on a tile ``[BLOCK_C channels, KK_PAD taps, BLOCK_P pixels]`` of one (batch, head): the k*k
taps of a pixel are one axis of the tile (padded to a power of two and masked), so one kernel source serves every
odd k, dilation and stride. Tensors are read and written through their strides (contiguous, channels_last or any
view; no copies). Accumulation is in ``ACC`` (float32 for float16/bfloat16/float32 inputs, float64 for float64).
A tap that falls on the zero padding is masked out of the loads *and* of the filter product, so a non-finite filter
value there contributes exactly 0. With ``NORM`` the raw k*k taps of a pixel are normalised in registers
(FilterNorm, paper Eq. 3: gain * (sp - mean) / (unbiased std + EPS)); the normalised filter is never written.
The gain is typed ``tl.float64`` in the signature (the JIT types a Python float fp32, which rounded an fp64 run's
gain) and converted to ACC in the kernel.

Bytes moved (n = B*C*Ho*Wo output values, m = B*head*k*k*Ho*Wo spatial-filter values, e = element size;
minimum = what any implementation must read and write once):

* ``ddf_fwd_kernel``: reads x once per tap *position* (the k*k shifted reads of an x tile hit L1/L2, DRAM
  reads x ~once), the spatial-filter tile of a pixel block once per program, i.e. once per ``BLOCK_C*CB``
  channels of a head (``ceil(C/head / (BLOCK_C*CB))`` times in all, from L2 after the first), the channel filter
  once per (b, c) and program; writes out once. Minimum: ``e*(B*C*H*W + m + B*C*k*k + n)``; DRAM traffic is that
  plus the repeated spatial-filter tiles, ``e*m*(ceil(Cg/(BLOCK_C*CB)) - 1)`` (0 when one program covers a head).
* ``ddf_bwd_filters_kernel`` (pass 1): reads grad_output, x, the spatial and channel filters once; writes
  grad_spatial once and fp32 per-pixel-block partial sums of grad_channel (``ceil(Ho*Wo/BLOCK_P)*B*C*k*k``
  values), reduced afterwards in a fixed order by ``torch.sum`` (deterministic, no atomics).
* ``ddf_bwd_input_kernel`` (pass 2): reads grad_output (gathered per tap, L1/L2 hits), the (normalised) spatial
  filter and the channel filter, writes grad_input once.
  The backward thus reads grad_output twice and x once; minimum: ``e*(2n' + ...)`` with each tensor once.
"""
from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["ddf_fwd_kernel", "ddf_bwd_filters_kernel", "ddf_bwd_input_kernel", "EPS"]

EPS = 1e-10


@triton.jit
def _out_taps(p, j, Ho, Wo, H, W, K: tl.constexpr, DIL, STRIDE):
    """Input coordinates [KK_PAD, BLOCK_P] read by output pixels ``p`` through taps ``j``, and their validity."""
    oy = p // Wo
    ox = p % Wo
    r = (K - 1) // 2
    iy = oy[None, :] * STRIDE + (j[:, None] // K - r) * DIL
    ix = ox[None, :] * STRIDE + (j[:, None] % K - r) * DIL
    valid = (j[:, None] < K * K) & (p[None, :] < Ho * Wo) & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
    return oy, ox, iy, ix, valid


@triton.jit
def _load_spatial(sp_ptr, sp_base, h, j, oy, ox, pmask, ssc, ssh, ssw, K: tl.constexpr, ACC: tl.constexpr):
    """The raw spatial-filter tile [KK_PAD, BLOCK_P] of head ``h`` (0 outside the k*k taps / the pixels)."""
    jm = j < K * K
    offs = sp_base + (h * K * K + j)[:, None] * ssc + oy[None, :] * ssh + ox[None, :] * ssw
    return tl.load(sp_ptr + offs, mask=jm[:, None] & pmask[None, :], other=0.0).to(ACC)


@triton.jit
def _filter_norm(raw, j, gain, K: tl.constexpr, EPS_: tl.constexpr):
    """FilterNorm over the taps axis (0) of a [KK_PAD, BLOCK_P] tile; padding rows stay 0."""
    jm = (j < K * K)[:, None]
    n = K * K
    mean = tl.sum(raw, axis=0) / n
    centred = tl.where(jm, raw - mean[None, :], 0.0)
    std = tl.sqrt(tl.sum(centred * centred, axis=0) / (n - 1))
    return centred / (std[None, :] + EPS_) * gain


@triton.jit
def _filter_norm_backward(raw, grad, j, gain, K: tl.constexpr, EPS_: tl.constexpr):
    """Gradient w.r.t. the raw taps of :func:`_filter_norm`, given the gradient w.r.t. its output."""
    jm = (j < K * K)[:, None]
    n = K * K
    mean = tl.sum(raw, axis=0) / n
    centred = tl.where(jm, raw - mean[None, :], 0.0)
    std = tl.sqrt(tl.sum(centred * centred, axis=0) / (n - 1))
    g = tl.where(jm, grad * gain, 0.0)
    first = (g - (tl.sum(g, axis=0) / n)[None, :]) / (std[None, :] + EPS_)
    denom = (n - 1) * std * (std + EPS_) * (std + EPS_)
    coef = tl.where(std > 0, tl.sum(g * centred, axis=0) / tl.where(std > 0, denom, 1.0), 0.0)
    return tl.where(jm, first - centred * coef[None, :], 0.0)


@triton.jit
def _load_channel(ch_ptr, ch_base, c, cmask, j, scc, sck, scl, K: tl.constexpr, ACC: tl.constexpr):
    """Channel-filter tile [BLOCK_C, KK_PAD] (taps j = ky*K + kx)."""
    offs = ch_base + c[:, None] * scc + (j // K)[None, :] * sck + (j % K)[None, :] * scl
    return tl.load(ch_ptr + offs, mask=cmask[:, None] & (j < K * K)[None, :], other=0.0).to(ACC)


@triton.jit
def ddf_fwd_kernel(x_ptr, ch_ptr, sp_ptr, out_ptr,
                   H, W, Ho, Wo, Cg, HEAD, DIL, STRIDE, gain: tl.float64,
                   sxb, sxc, sxh, sxw, scb, scc, sck, scl, ssb, ssc, ssh, ssw, sob, soc, soh, sow,
                   K: tl.constexpr, KK_PAD: tl.constexpr, MUL: tl.constexpr, NORM: tl.constexpr,
                   ACC_F64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CB: tl.constexpr):
    """out[b, c, p] = sum_j f_j * x[b, c, p + off_j]; grid (pixel blocks, B*HEAD, channel chunks of BLOCK_C*CB)."""
    if ACC_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = (pid_bh // HEAD).to(tl.int64)
    h = pid_bh % HEAD
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < Ho * Wo
    j = tl.arange(0, KK_PAD)
    oy, ox, iy, ix, valid = _out_taps(p, j, Ho, Wo, H, W, K, DIL, STRIDE)
    sp = _load_spatial(sp_ptr, b * ssb, h, j, oy, ox, pmask, ssc, ssh, ssw, K, ACC)
    if NORM:
        sp = _filter_norm(sp, j, tl.full((), gain, ACC), K, 1e-10)
    x_pix = iy * sxh + ix * sxw
    c_first = h * Cg + pid_c * (BLOCK_C * CB)
    c_stop = tl.minimum(h * Cg + Cg, c_first + BLOCK_C * CB)
    c0 = c_first
    while c0 < c_stop:  # not range(): triton 3.6's interpreter cannot index() its 1-element scalars (numpy >= 2.4)
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < c_stop
        chv = _load_channel(ch_ptr, b * scb, c, cmask, j, scc, sck, scl, K, ACC)
        m3 = cmask[:, None, None] & valid[None, :, :]
        xv = tl.load(x_ptr + b * sxb + c[:, None, None] * sxc + x_pix[None, :, :], mask=m3, other=0.0).to(ACC)
        if MUL:
            f = sp[None, :, :] * chv[:, :, None]
        else:
            f = sp[None, :, :] + chv[:, :, None]
        acc = tl.sum(tl.where(m3, xv * f, 0.0), axis=1)
        o_offs = b * sob + c[:, None] * soc + oy[None, :] * soh + ox[None, :] * sow
        tl.store(out_ptr + o_offs, acc.to(out_ptr.dtype.element_ty), mask=cmask[:, None] & pmask[None, :])
        c0 += BLOCK_C


@triton.jit
def ddf_bwd_filters_kernel(go_ptr, x_ptr, ch_ptr, sp_ptr, gsp_ptr, gch_part_ptr,
                           C, H, W, Ho, Wo, Cg, HEAD, DIL, STRIDE, gain: tl.float64,
                           sgb, sgc, sgh, sgw, sxb, sxc, sxh, sxw, scb, scc, sck, scl, ssb, ssc, ssh, ssw,
                           stb, stc, sth, stw, B,
                           K: tl.constexpr, KK_PAD: tl.constexpr, MUL: tl.constexpr, NORM: tl.constexpr,
                           ACC_F64: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr):
    """Pass 1 of the backward, grid (pixel blocks, B*HEAD): grad_spatial (summed over the head's channels,
    FilterNorm backward fused) and per-pixel-block partials of grad_channel, part[pid_p, b, c, j]."""
    if ACC_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    pid_p = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // HEAD).to(tl.int64)
    h = pid_bh % HEAD
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < Ho * Wo
    j = tl.arange(0, KK_PAD)
    jm = j < K * K
    oy, ox, iy, ix, valid = _out_taps(p, j, Ho, Wo, H, W, K, DIL, STRIDE)
    raw = _load_spatial(sp_ptr, b * ssb, h, j, oy, ox, pmask, ssc, ssh, ssw, K, ACC)
    sp = raw
    gain_acc = tl.full((), gain, ACC)  # the fp64 argument at the accumulation precision
    if NORM:
        sp = _filter_norm(raw, j, gain_acc, K, 1e-10)
    sp = tl.where(valid, sp, 0.0)
    x_pix = iy * sxh + ix * sxw
    gsp = tl.zeros((KK_PAD, BLOCK_P), dtype=ACC)
    c0 = h * Cg
    while c0 < h * Cg + Cg:  # not range(), see ddf_fwd_kernel
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < h * Cg + Cg
        m3 = cmask[:, None, None] & valid[None, :, :]
        xv = tl.load(x_ptr + b * sxb + c[:, None, None] * sxc + x_pix[None, :, :], mask=m3, other=0.0).to(ACC)
        g_offs = b * sgb + c[:, None] * sgc + oy[None, :] * sgh + ox[None, :] * sgw
        gov = tl.load(go_ptr + g_offs, mask=cmask[:, None] & pmask[None, :], other=0.0).to(ACC)
        gx = gov[:, None, :] * xv
        if MUL:
            chv = _load_channel(ch_ptr, b * scb, c, cmask, j, scc, sck, scl, K, ACC)
            gsp += tl.sum(tl.where(m3, gx * chv[:, :, None], 0.0), axis=0)
            part = tl.sum(gx * sp[None, :, :], axis=2)
        else:
            gsp += tl.sum(gx, axis=0)
            part = tl.sum(gx, axis=2)
        part_offs = ((pid_p * B + b) * C + c[:, None]) * (K * K) + j[None, :]
        tl.store(gch_part_ptr + part_offs, part.to(gch_part_ptr.dtype.element_ty),
                 mask=cmask[:, None] & jm[None, :])
        c0 += BLOCK_C
    gsp = tl.where(valid, gsp, 0.0)
    if NORM:
        gsp = _filter_norm_backward(raw, gsp, j, gain_acc, K, 1e-10)
    t_offs = b * stb + (h * K * K + j)[:, None] * stc + oy[None, :] * sth + ox[None, :] * stw
    tl.store(gsp_ptr + t_offs, gsp.to(gsp_ptr.dtype.element_ty), mask=jm[:, None] & pmask[None, :])


@triton.jit
def ddf_bwd_input_kernel(go_ptr, ch_ptr, sp_ptr, gin_ptr,
                         H, W, Ho, Wo, Cg, HEAD, DIL, STRIDE,
                         sgb, sgc, sgh, sgw, scb, scc, sck, scl, ssb, ssc, ssh, ssw, snb, snc, snh, snw,
                         K: tl.constexpr, KK_PAD: tl.constexpr, MUL: tl.constexpr, ACC_F64: tl.constexpr,
                         BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr, CB: tl.constexpr):
    """Pass 2 of the backward, grid (input-pixel blocks, B*HEAD, channel chunks): grad_input gathered from the
    output pixels that read each input pixel (the spatial filter given here is already normalised)."""
    if ACC_F64:
        ACC: tl.constexpr = tl.float64
    else:
        ACC: tl.constexpr = tl.float32
    pid_q = tl.program_id(0)
    pid_bh = tl.program_id(1)
    pid_c = tl.program_id(2)
    b = (pid_bh // HEAD).to(tl.int64)
    h = pid_bh % HEAD
    q = pid_q * BLOCK_P + tl.arange(0, BLOCK_P)
    qmask = q < H * W
    iy = q // W
    ix = q % W
    j = tl.arange(0, KK_PAD)
    r = (K - 1) // 2
    ty = iy[None, :] - (j[:, None] // K - r) * DIL
    tx = ix[None, :] - (j[:, None] % K - r) * DIL
    oy = ty // STRIDE
    ox = tx // STRIDE
    valid = ((j[:, None] < K * K) & qmask[None, :] & (ty >= 0) & (tx >= 0) & (ty % STRIDE == 0)
             & (tx % STRIDE == 0) & (oy < Ho) & (ox < Wo))
    s_offs = b * ssb + (h * K * K + j)[:, None] * ssc + oy * ssh + ox * ssw
    sp = tl.load(sp_ptr + s_offs, mask=valid, other=0.0).to(ACC)
    g_pix = oy * sgh + ox * sgw
    c_first = h * Cg + pid_c * (BLOCK_C * CB)
    c_stop = tl.minimum(h * Cg + Cg, c_first + BLOCK_C * CB)
    c0 = c_first
    while c0 < c_stop:  # not range(): triton 3.6's interpreter cannot index() its 1-element scalars (numpy >= 2.4)
        c = c0 + tl.arange(0, BLOCK_C)
        cmask = c < c_stop
        m3 = cmask[:, None, None] & valid[None, :, :]
        gov = tl.load(go_ptr + b * sgb + c[:, None, None] * sgc + g_pix[None, :, :], mask=m3, other=0.0).to(ACC)
        chv = _load_channel(ch_ptr, b * scb, c, cmask, j, scc, sck, scl, K, ACC)
        if MUL:
            f = sp[None, :, :] * chv[:, :, None]
        else:
            f = sp[None, :, :] + chv[:, :, None]
        acc = tl.sum(tl.where(m3, gov * f, 0.0), axis=1)
        n_offs = b * snb + c[:, None] * snc + iy[None, :] * snh + ix[None, :] * snw
        tl.store(gin_ptr + n_offs, acc.to(gin_ptr.dtype.element_ty), mask=cmask[:, None] & qmask[None, :])
        c0 += BLOCK_C
