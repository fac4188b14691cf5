"""GPU-only risks checked on CPU (issue 23 item 4): the Triton path's Python side makes no host sync and a fixed,
small number of kernel launches per DDF op call, whatever the input. The kernels themselves are replaced by a
recorder, so only our launch code runs (the interpreter's own tensor-to-numpy conversions are not counted)."""
from __future__ import annotations

import collections

import pytest
import torch

import ddf
from ddf.backends.triton import launch

SYNCS = ("item", "tolist", "__bool__", "cpu", "numpy")


@pytest.fixture
def recorded(monkeypatch):
    """Counts of kernel launches (by kernel name) and of host-syncing tensor calls while the fixture is active."""
    counts = collections.Counter()

    def fake_launcher(kernel):
        name = getattr(kernel, "__name__", None) or getattr(getattr(kernel, "fn", None), "__name__", str(kernel))

        class Grid:
            def __getitem__(self, grid):
                def launch_(*args, **kwargs):
                    counts["launch:" + name] += 1
                return launch_
        return Grid()

    monkeypatch.setattr(launch, "_launcher", fake_launcher)
    for attr in SYNCS:
        original = getattr(torch.Tensor, attr)

        def counting(self, *a, _orig=original, _attr=attr, **k):
            counts["sync:" + _attr] += 1
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, attr, counting)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: counts.update(["sync:cuda.synchronize"]))
    return counts


def _inputs(norm_head=1, k=3, s=1, cl=False):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 9, 10, generator=g)
    ho, wo = (9 - 1) // s + 1, (10 - 1) // s + 1
    sp = torch.randn(2, norm_head * k * k, ho, wo, generator=g)
    if cl:
        x, sp = (t.contiguous(memory_format=torch.channels_last) for t in (x, sp))
    return x, torch.randn(2, 8, k, k, generator=g), sp, torch.randn(2, 8, ho, wo, generator=g)


@pytest.mark.parametrize("norm", [False, True])
@pytest.mark.parametrize("cl", [False, True])
def test_op_makes_no_host_sync_and_one_launch_forward_two_backward(recorded, norm, cl):
    x, ch, sp, go = _inputs(norm_head=2, k=3, s=2, cl=cl)
    go = go[:, :, :5, :5].contiguous()
    args = (3, 1, 2, 2, 0, norm, 0.7)
    with ddf.use_backend("triton"):
        torch.ops.ddf.ddf_forward(x, ch, sp, *args)
        fwd = dict(recorded)
        torch.ops.ddf.ddf_backward(go, x, ch, sp, *args)
    syncs = {k: v for k, v in recorded.items() if k.startswith("sync:")}
    assert syncs == {}, f"host syncs in the Triton launch path: {syncs}"
    launches = {k: v for k, v in recorded.items() if k.startswith("launch:")}
    assert sum(v for k, v in fwd.items() if k.startswith("launch:")) == 1
    assert sum(launches.values()) == 3, launches  # forward 1; backward: filters pass + input pass


def test_ddfpack_step_makes_no_host_sync(recorded):
    torch.manual_seed(0)
    m = ddf.DDFPack(8, kernel_size=3, head=2)
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    with ddf.use_backend("triton"):
        out = m(x)
        out.backward(torch.ones_like(out))
    syncs = {k: v for k, v in recorded.items() if k.startswith("sync:")}
    assert syncs == {}, f"host syncs in a DDFPack forward + backward: {syncs}"
    assert sum(v for k, v in recorded.items() if k.startswith("launch:")) == 3
