"""Tests of the latency benchmark (test_time.py) and of the PAC baseline (benchmarks/pac.py)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.pac import PacConv2dBaseline, pac_conv2d, pac_conv2d_naive  # noqa: E402


@pytest.mark.parametrize("dilation,stride,separate_guidance", [(1, 1, False), (2, 1, True), (1, 2, False)])
def test_pac_matches_naive_loop(dilation, stride, separate_guidance):
    g = torch.Generator().manual_seed(0)
    B, C, Co, H, W, k = 2, 3, 4, 6, 7, 3
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64)
    # scaled guidance so the Gaussian kernel takes values spread over (0, 1], not all ~0
    guide = 0.4 * torch.randn(B, 2, H, W, generator=g, dtype=torch.float64) if separate_guidance else None
    if guide is None:
        x = 0.4 * x
    w = torch.randn(Co, C, k, k, generator=g, dtype=torch.float64)
    b = torch.randn(Co, generator=g, dtype=torch.float64)
    fast = pac_conv2d(x, w, b, guide, dilation=dilation, stride=stride)
    slow = pac_conv2d_naive(x, w, b, guide, dilation=dilation, stride=stride)
    assert fast.shape == slow.shape == (B, Co, (H - 1) // stride + 1, (W - 1) // stride + 1)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    # the adapting kernel matters: the result differs from a plain convolution
    plain = torch.nn.functional.conv2d(x, w, b, stride=stride, padding=dilation, dilation=dilation)
    assert (fast - plain).abs().max() > 1e-3


def test_pac_module_float32_and_grad():
    torch.manual_seed(0)
    m = PacConv2dBaseline(4, 5, 3)
    x = (0.3 * torch.randn(1, 4, 5, 6)).requires_grad_()
    y = m(x)
    ref = pac_conv2d_naive(x.detach().double(), m.weight.detach().double(), m.bias.detach().double())
    torch.testing.assert_close(y.detach().double(), ref, rtol=1e-4, atol=1e-5)
    y.square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_pac_bad_args():
    x = torch.randn(1, 4, 5, 6)
    with pytest.raises(ValueError, match="weight"):
        pac_conv2d(x, torch.randn(3, 2, 3, 3))
    with pytest.raises(ValueError, match="guidance"):
        pac_conv2d(x, torch.randn(3, 4, 3, 3), guidance=torch.randn(1, 2, 4, 6))
    with pytest.raises(ValueError, match="kernel_size"):
        PacConv2dBaseline(4, 4, 2)
