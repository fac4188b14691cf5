"""The Triton launchers, checked without a GPU: the JIT's own signature for the launchers' real arguments (the
FilterNorm gain reaches the kernels as fp64: issue 27 item 3, which the interpreter cannot show, since it keeps a
Python float in fp64 anyway) and the device guard around every launch (item 6)."""
import contextlib
import os
import subprocess
import sys
import types

import pytest
import torch

pytest.importorskip("triton")

from ddf.backends.triton import launch  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# B, C, H, W, k, head: channels_last, stride 1 / dilation 1 (so HEAD-like ints are specialised as the JIT does)
SHAPE = (2, 8, 7, 6, 3, 2)


def _inputs(dtype, channels_last=False):
    B, C, H, W, k, head = SHAPE
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    ch = torch.randn(B, C, k, k, generator=g, dtype=torch.float64).to(dtype)
    sp = torch.randn(B, head * k * k, H, W, generator=g, dtype=torch.float64).to(dtype)
    go = torch.randn(B, C, H, W, generator=g, dtype=torch.float64).to(dtype)
    if channels_last:
        x, sp, go = (t.contiguous(memory_format=torch.channels_last) for t in (x, sp, go))
    return go, x, ch, sp


@pytest.fixture
def launches(monkeypatch):
    """Record every launch (kernel, grid, args, kwargs) instead of running it; the plain kernels with one full
    config are launched (the interpreter's path), on any machine."""
    calls = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.kernel, grid, args, kwargs))

    monkeypatch.setattr(launch, "INTERPRET", True)
    monkeypatch.setattr(launch, "_launcher", Recorder)
    return calls


def _run_launchers(dtype, channels_last=False, gain=0.1):
    go, x, ch, sp = _inputs(dtype, channels_last)
    k, head = SHAPE[4:]
    launch.forward(x, ch, sp, k, 1, 1, head, 0, True, gain)
    launch.backward(go, x, ch, sp, k, 1, 1, head, 0, True, gain)


def jit_signature(kernel, args, kwargs, arch=90):
    """{argument: type} as ``JITFunction.run`` specialises the arguments (its binder, CUDA backend of ``arch``)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)  # interpreter: the same source
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", arch, 32)))
    _, specialization, _ = binder(*args, **kwargs)
    return dict(zip(jit.arg_names, (s[0] for s in specialization)))


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
def test_gain_reaches_the_kernels_as_fp64(launches, dtype, channels_last):
    """Old main: a Python float is specialised 'fp32' by the JIT, so an fp64 FilterNorm was rounded to fp32 on a
    GPU (forward error 1e-15 -> 1e-7). The kernels now type ``gain: tl.float64`` and convert it to ACC."""
    _run_launchers(dtype, channels_last)
    names = [c[0].fn.__name__ for c in launches]
    assert names == ["ddf_fwd_kernel", "ddf_bwd_filters_kernel", "ddf_bwd_input_kernel"], names
    ptr = {torch.float64: "*fp64", torch.float32: "*fp32", torch.float16: "*fp16"}[dtype]
    for kernel, grid, args, kwargs in launches[:2]:
        sig = jit_signature(kernel, args, kwargs)
        assert sig["x_ptr"] == ptr, sig
        assert sig["gain"] == "fp64", (kernel.fn.__name__, sig["gain"])
        assert args[kernel.arg_names.index("gain")] == 0.1


def test_fp64_kernels_compile_the_gain_as_f64():
    """The AOT path with the launchers' real arguments (as ``JITFunction.run`` compiles them, sm_80): the fp64
    FilterNorm kernels take an ``.f64`` gain parameter and never round through fp32; the fp32 forward converts it
    once. Compiled kernels, not the interpreter: a subprocess."""
    code = r"""
import re, sys, torch, triton
sys.path.insert(0, "tests")
import test_triton_launch as t
from ddf.backends.triton import launch
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
calls = []
class Recorder:
    def __init__(self, kernel):
        self.kernel = kernel
    def __getitem__(self, grid):
        return lambda *args, **kwargs: calls.append((self.kernel, args, kwargs))
launch.INTERPRET, launch._launcher = True, Recorder
for dtype in (torch.float64, torch.float32):
    calls.clear()
    t._run_launchers(dtype)
    for kernel, args, kwargs in calls[:2 if dtype == torch.float64 else 1]:
        target = GPUTarget("cuda", 80, 32)
        binder = triton.runtime.jit.create_function_from_signature(
            kernel.signature, kernel.params, triton.compiler.compiler.make_backend(target))
        bound, spec, _ = binder(*args, **kwargs)
        _, sig, constexprs, attrs = kernel._pack_args(
            triton.compiler.compiler.make_backend(target), {}, bound, spec, None)
        ptx = triton.compile(ASTSource(kernel, sig, constexprs, attrs), target=target).asm["ptx"]
        at = kernel.arg_names.index("gain")
        i = at - sum(1 for s in spec[:at] if s[0] == "constexpr")  # constexprs are no PTX parameters
        param = re.search(r"\.param \.(\w+) \w+_param_%d\b" % i, ptx).group(1)
        to_f32 = len(re.findall(r"cvt\.rn\.f32\.f64", ptx))
        print(kernel.fn.__name__, dtype, param, to_f32)
        assert param == "f64", param
        assert to_f32 == (0 if dtype == torch.float64 else 1), to_f32
print("GAIN_F64_OK")
"""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "GAIN_F64_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ device guard
class _RecordingCudaDevice:
    """Stands in for ``torch.cuda.device``: records the index it was entered with."""
    entered = []

    def __init__(self, device):
        self.index = torch.device(device).index

    def __enter__(self):
        self.entered.append(self.index)

    def __exit__(self, *exc):
        self.entered.append("exit")


def test_device_guard_enters_the_tensors_cuda_device(monkeypatch):
    """A real cuda:1 tensor (stood in for: no GPU here) is launched under torch.cuda.device(1), whatever the current
    device; CPU tensors and fake CUDA tensors (tracing) get a no-op that never touches torch.cuda."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    monkeypatch.setattr(_RecordingCudaDevice, "entered", [])
    monkeypatch.setattr(torch.cuda, "device", _RecordingCudaDevice)
    with launch.device_guard(types.SimpleNamespace(device=torch.device("cuda", 1))):
        pass
    assert _RecordingCudaDevice.entered == [1, "exit"]

    def no_cuda(device):
        raise AssertionError(f"torch.cuda.device({device}) entered")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    with FakeTensorMode():
        fake = torch.empty(2, 3, device="cuda:1")
    assert isinstance(launch.device_guard(fake), contextlib.nullcontext)
    assert isinstance(launch.device_guard(torch.empty(2)), contextlib.nullcontext)


def test_every_launch_is_inside_the_device_guard(launches, monkeypatch):
    """Old main launched on the current device (no guard at all). Each of the three launches (forward, backward
    passes 1 and 2) happens inside ``device_guard(first tensor argument)``."""
    state = {"inside": None}
    guarded = []

    @contextlib.contextmanager
    def guard(tensor):
        guarded.append(tensor)
        state["inside"] = tensor.device
        try:
            yield
        finally:
            state["inside"] = None

    monkeypatch.setattr(launch, "device_guard", guard)
    real_launcher = launch._launcher

    class Checking:
        def __init__(self, kernel):
            self.inner = real_launcher(kernel)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                assert state["inside"] == args[0].device, "a launch outside the device guard"
                self.inner[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(launch, "_launcher", Checking)
    _run_launchers(torch.float32, channels_last=True)
    assert len(launches) == 3 and len(guarded) == 3
    assert [g is c[2][0] for g, c in zip(guarded, launches)] == [True] * 3


@pytest.mark.skipif(not launch.INTERPRET, reason="the kernels run here only under Triton's interpreter")
def test_device_guard_is_a_no_op_in_the_interpreter(monkeypatch):
    """Real interpreted launches on CPU tensors never enter torch.cuda.device (a CUDA call would fail here)."""
    def no_cuda(device):
        raise AssertionError(f"torch.cuda.device({device}) entered")

    monkeypatch.setattr(torch.cuda, "device", no_cuda)
    _run_launchers(torch.float64)


# --------------------------------------------------------------------------------------------------- autotuning
def _same(a, b):
    return a.kwargs == b.kwargs and a.num_warps == b.num_warps


@pytest.mark.parametrize("f64", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_tile_config_is_fixed_fits_and_is_what_the_aot_check_compiles(k, f64):
    from ddf.backends.triton import compile_check

    kk_pad = 1 << (k * k - 1).bit_length()
    cfg = launch.tile_config(kk_pad, f64)
    assert _same(cfg, launch.tile_config(kk_pad, f64))  # a function of (k, dtype) only: every rank, every run
    assert any(_same(cfg, c) for c in launch.tile_configs())
    assert launch._fits(cfg, kk_pad, f64) or not any(launch._fits(c, kk_pad, f64) for c in launch.tile_configs())
    for kernel in ("fwd", "bwd_input"):
        block_c, block_p, cb, warps = compile_check._configs(kernel, k, f64, False)[0]
        assert cfg.kwargs == {"BLOCK_C": block_c, "BLOCK_P": block_p, "CB": cb} and cfg.num_warps == warps


@pytest.mark.parametrize("kk_pad,f64", [(1, False), (16, False), (16, True), (64, False), (64, True)])
def test_prune_configs_keeps_the_fitting_configs(kk_pad, f64):
    """The autotuner's own prune_configs (with our early_config_prune): configs that fit, or the smallest one."""
    tuned = launch._tuned(launch.ddf_fwd_kernel)
    tuned.nargs = {}
    kept = tuned.prune_configs({"KK_PAD": kk_pad, "ACC_F64": f64})
    fitting = [c for c in launch.tile_configs() if launch._fits(c, kk_pad, f64)]
    assert kept and all(launch._fits(c, kk_pad, f64) for c in kept) == bool(fitting)
    assert [c.kwargs for c in kept] == ([c.kwargs for c in fitting] or [{"BLOCK_C": 1, "BLOCK_P": 32, "CB": 32}])


def test_autotune_wanted_only_where_it_cannot_hurt(monkeypatch):
    cuda = types.SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    monkeypatch.delenv(launch.AUTOTUNE_ENV, raising=False)
    assert not launch.autotune_wanted(cuda)  # default: the fixed config
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "1")
    assert launch.autotune_wanted(cuda)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert not launch.autotune_wanted(cuda)  # a CUDA-graph capture: no benchmark inside it
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)  # what train.py --deterministic sets
    try:
        assert not launch.autotune_wanted(cuda)
    finally:
        torch.use_deterministic_algorithms(before)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda group=None: 2)
    assert not launch.autotune_wanted(cuda)  # ranks could choose differently
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "yes")
    with pytest.raises(ValueError, match="DDF_TRITON_AUTOTUNE must be 0 or 1"):
        launch.autotune_wanted(cuda)


@pytest.fixture
def gpu_path(monkeypatch):
    """The launchers' GPU path (fixed config or autotuner), its kernels run by Triton's interpreter on CPU."""
    if not launch.INTERPRET:
        pytest.skip("the GPU launch path runs on CPU tensors only under Triton's interpreter")
    monkeypatch.setattr(launch, "INTERPRET", False)
    monkeypatch.setattr(launch, "_launcher", lambda kernel: kernel)
    for tuned in (launch._tuned(launch.ddf_fwd_kernel), launch._tuned(launch.ddf_bwd_input_kernel)):
        monkeypatch.setattr(tuned, "cache", {})


def _check_against_reference(dtype=torch.float64):
    from ddf.reference import ddf_reference, ddf_reference_backward

    go, x, ch, sp = _inputs(dtype, channels_last=True)
    k, head = SHAPE[4:]
    out = launch.forward(x, ch, sp, k, 1, 1, head, 0, True, 0.3)
    grads = launch.backward(go, x, ch, sp, k, 1, 1, head, 0, True, 0.3)
    d = [t.double() for t in (go, x, ch, sp)]
    ref = ddf_reference(*d[1:], k, 1, 1, head, "mul", True, 0.3)
    refs = ddf_reference_backward(*d, k, 1, 1, head, "mul", True, 0.3)
    for got, want in zip([out, *grads], [ref, *refs]):
        assert (got.double() - want).abs().max() <= 1e-10 * want.abs().max().clamp_min(1.0)


def test_default_gpu_path_runs_the_fixed_config_unbenchmarked(gpu_path, monkeypatch):
    from triton.runtime.autotuner import Autotuner

    def no_bench(self, *args, **kwargs):
        raise AssertionError("benchmarked")

    monkeypatch.setattr(Autotuner, "_bench", no_bench)
    monkeypatch.delenv(launch.AUTOTUNE_ENV, raising=False)
    _check_against_reference()
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "1")
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        _check_against_reference()  # --deterministic pins the fixed config even when autotuning is asked for
    finally:
        torch.use_deterministic_algorithms(before)
    assert not launch._tuned(launch.ddf_fwd_kernel).cache and not launch._tuned(launch.ddf_bwd_input_kernel).cache


def test_autotuned_path_with_the_benchmark_mocked(gpu_path, monkeypatch):
    """No test ran the autotuned path on old main (the interpreter runs the plain kernel). The autotuner's run: prunes,
    'times' every kept config once per shape (mocked: the last one wins), caches the choice, launches it."""
    monkeypatch.setenv(launch.AUTOTUNE_ENV, "1")
    timed = []
    for tuned in (launch._tuned(launch.ddf_fwd_kernel), launch._tuned(launch.ddf_bwd_input_kernel)):
        def bench(*args, config, _tuned=tuned, **meta):
            timed.append((_tuned, config))
            return [float(-len(timed))]  # later configs are "faster"
        monkeypatch.setattr(tuned, "_bench", bench)
    _check_against_reference()
    kk_pad, n_kept = 16, len([c for c in launch.tile_configs() if launch._fits(c, 16, True)])
    assert n_kept > 1 and len(timed) == 2 * n_kept
    for tuned in (launch._tuned(launch.ddf_fwd_kernel), launch._tuned(launch.ddf_bwd_input_kernel)):
        (key, chosen), = tuned.cache.items()
        assert chosen is [c for t, c in timed if t is tuned][-1]
    _check_against_reference()  # second call: cached, not timed again
    assert len(timed) == 2 * n_kept


# --------------------------------------------------------------------------- register pressure and occupancy
@pytest.mark.parametrize("arch,regs,warps,shared,want", [
    (80, 128, 4, 2048, 16),   # 65536 / (128 * 32 * 4) = 4 programs
    (90, 255, 4, 4096, 8),    # rounded up to 256 a thread: 2 programs (the triton 3.6 forward before)
    (90, 183, 4, 2048, 8),    # 184 * 128 * 2 < 65536 < 184 * 128 * 3
    (80, 64, 4, 2048, 32),
    (90, 16, 4, 0, 64),       # capped by 64 warps per SM, no shared-memory term
    (80, 32, 4, 100 * 1024, 4),  # shared memory: one program of 100 KB in 164 KB
    (90, 32, 4, 100 * 1024, 8),  # two in 228 KB
    (75, 64, 4, 1024, 32),    # sm_75: 32 warps per SM
    (80, 72, 8, 1024, 24),    # 72 * 32 * 8 = 18432: 3 programs of 8 warps
])
def test_resident_warps_model(arch, regs, warps, shared, want):
    from ddf.backends.triton import compile_check

    assert compile_check.resident_warps(arch, regs, warps, shared) == want
    assert compile_check.resident_warps(120, regs, warps, shared) is None  # no limits known: not guessed


def test_the_compile_check_fails_over_128_registers():
    from ddf.backends.triton import compile_check

    row = {"error": "", "spills": 0, "registers": 128}
    assert compile_check.failures(row) == []
    assert compile_check.failures(dict(row, registers=129)) == ["129 > 128 registers"]
    assert compile_check.failures(dict(row, spills=32)) == ["32 bytes spilled"]
    assert compile_check.failures(dict(row, error="CompilationError: x")) == ["compile error"]


def test_every_autotune_config_fits_the_budget_at_k3():
    """The default AOT table compiles every autotune config (fp32, k=3): each must be within the tile budget."""
    assert all(launch._fits(c, 16, False) for c in launch.tile_configs())


@pytest.mark.parametrize("f64", [False, True])
@pytest.mark.parametrize("k", [1, 3, 5, 7])
def test_filters_config_fits_and_is_what_the_aot_check_compiles(k, f64, monkeypatch):
    """Backward pass 1 on a GPU: BLOCK_C, BLOCK_P *and* num_warps as compile_check compiles them, the tile within its
    budget (half the forward's per warp, an eighth in fp64) unless already at 32 warps; k >= 5 has the warp counts
    that compiled unspilled (launch.gpu_filters_blocks)."""
    from ddf.backends.triton import compile_check

    monkeypatch.setattr(launch, "INTERPRET", False)
    kk_pad = 1 << (k * k - 1).bit_length()
    block_c, block_p, _, warps = compile_check._configs("bwd_filters", k, f64, False)[0]
    per_warp = launch._TILE_BUDGET // (8 if f64 else 2)
    assert block_c * kk_pad * block_p <= per_warp * warps or warps == 32 or (kk_pad >= 32 and warps == 16 and f64)
    assert launch.filters_config(kk_pad, f64, 8, 64) == {"BLOCK_C": block_c, "BLOCK_P": block_p, "num_warps": warps}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_filters_pass_launches_with_its_num_warps(dtype, launches, monkeypatch):
    from ddf.backends.triton import compile_check

    monkeypatch.setattr(launch, "INTERPRET", False)
    go, x, ch, sp = _inputs(dtype)
    launch._filters_pass(go, x, ch, sp, torch.empty_like(sp), SHAPE[4], 1, 1, SHAPE[5], 0, False, 1.0)
    (kernel, grid, args, kwargs), = launches
    block_c, block_p, _, warps = compile_check._configs("bwd_filters", SHAPE[4], dtype == torch.float64, False)[0]
    assert kernel is launch.ddf_bwd_filters_kernel
    assert (kwargs["BLOCK_C"], kwargs["BLOCK_P"], kwargs["num_warps"]) == (block_c, block_p, warps)


def test_default_variants_fit_128_registers_unspilled():
    """The launcher's default config of each kernel, compiled for sm_80 as the AOT check does, in the variants that
    needed the most registers before (triton 3.8: bwd_filters fp32 channels_last FilterNorm, 183; triton 3.6: the
    fp32 forward, 232-255, and bwd_input, 255): <= 128 registers, no spills. Compiled kernels: a subprocess."""
    code = r"""
from ddf.backends.triton import compile_check as cc
rows = []
for kernel, layout, norm in (("fwd", "nchw", True), ("bwd_filters", "nhwc", True), ("bwd_input", "nchw", False)):
    bc, bp, cb, w = cc._configs(kernel, 3, False, False)[0]
    v = cc.Variant(kernel, "fp32", layout, True, norm, 3, bc, bp, cb, w)
    row = cc.compile_variant((v, 80))
    print(row)
    assert not cc.failures(row), row
    assert row["warps_per_sm"] >= 16, row
print("REGS_OK")
"""
    env = dict(os.environ, TRITON_INTERPRET="0", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0 and "REGS_OK" in res.stdout, res.stdout[-3000:] + res.stderr[-3000:]
