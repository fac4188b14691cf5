"""The program compute-sanitizer checks: a small forward + backward of every Triton kernel family (forward,
grad of the filters, grad of the input) over dtypes, layouts, mul/add, stride, head, fused FilterNorm.

    python -m tools.acceptance.sanitizer_target [--backward-only]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

CASES = [  # dtype, channels_last, combine, k, dilation, stride, head, norm
    (torch.float32, False, 0, 3, 1, 1, 1, False), (torch.float16, True, 1, 3, 1, 2, 1, False),
    (torch.bfloat16, False, 0, 5, 2, 1, 2, False), (torch.float32, True, 0, 3, 1, 1, 2, True),
    (torch.float64, False, 1, 7, 1, 1, 1, False), (torch.float16, False, 0, 1, 1, 1, 1, False),
]


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--backward-only", action="store_true", help="launch only the backward kernels' checks")
    args = p.parse_args(argv)
    import ddf

    device = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    n = 0
    for dtype, cl, comb, k, d, s, h, norm in CASES:
        g = torch.Generator(device=device).manual_seed(n)
        B, C, H, W = 2, 4 * h, 11, 9
        Ho, Wo = (H - 1) // s + 1, (W - 1) // s + 1
        x = torch.randn(B, C, H, W, device=device, dtype=dtype, generator=g)
        ch = torch.randn(B, C, k, k, device=device, dtype=dtype, generator=g)
        sp = torch.randn(B, h * k * k, Ho, Wo, device=device, dtype=dtype, generator=g)
        go = torch.randn(B, C, Ho, Wo, device=device, dtype=dtype, generator=g)
        if cl:
            x, sp, go = (t.contiguous(memory_format=torch.channels_last) for t in (x, sp, go))
        op = (k, d, s, h, comb, norm, 0.5)
        with ddf.use_backend("triton"):
            if not args.backward_only:
                out = torch.ops.ddf.ddf_forward(x, ch, sp, *op)
                assert torch.isfinite(out).all(), "non-finite forward output"
            grads = torch.ops.ddf.ddf_backward(go, x, ch, sp, *op)
        assert all(torch.isfinite(t).all() for t in grads), "non-finite gradient"
        n += 1
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"ok: {n} cases ({'backward' if args.backward_only else 'forward + backward'}) on {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
