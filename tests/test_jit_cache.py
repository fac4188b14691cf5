"""The C++ JIT build's cache (issue 29 item 2): one build per (sources, flags, torch version), shared by
checkouts with the same sources, retried after a failure; and the run header's op label / fail-fast rule.

The cache logic runs against a fake ``cpp_extension.load`` that "compiles" only when its build folder holds no
library yet (what torch's ninja build does), so two checkouts can be exercised without two 2.5-min builds."""
import os
import shutil

import pytest
import torch
from torch.utils import cpp_extension

from ddf import backends
from ddf.backends import cpp

SRC = cpp._SRC_DIR


def _clone(tmp_path, name, edit=None):
    dst = tmp_path / name / "ddf" / "csrc"
    shutil.copytree(SRC, dst)
    if edit:
        with open(dst / "ddf_common.h", "a") as f:
            f.write(edit)
    return str(dst)


class FakeBuild:
    def __init__(self, fail=False):
        self.compiles, self.calls, self.fail = [], [], fail

    def __call__(self, name, sources, extra_cflags, extra_ldflags, extra_include_paths, build_directory, verbose):
        self.calls.append(dict(name=name, sources=sources, include=extra_include_paths, dir=build_directory))
        lib = os.path.join(build_directory, name + ".so")
        if self.fail:
            raise RuntimeError("Error building extension 'ddf_C': ninja: build stopped: interrupted by user.")
        if not os.path.exists(lib):
            self.compiles.append(build_directory)
            open(lib, "w").close()


@pytest.fixture
def fake(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    build = FakeBuild()
    monkeypatch.setattr(cpp_extension, "load", build)
    return build


def test_key_ignores_the_checkout_path_and_follows_sources_flags_torch(tmp_path, monkeypatch):
    a, b = _clone(tmp_path, "a"), _clone(tmp_path, "b")
    changed = _clone(tmp_path, "c", edit="\n// changed\n")
    assert cpp.build_key(a) == cpp.build_key(b) == cpp.build_key(SRC)
    assert cpp.build_key(changed) != cpp.build_key(a)
    flags = {"CFLAGS": ["-O3", "-fopenmp"], "LDFLAGS": ["-fopenmp"]}
    assert cpp.build_key(a, flags) != cpp.build_key(a, dict(flags, CFLAGS=["-O2", "-fopenmp"]))
    key = cpp.build_key(a, flags)
    monkeypatch.setattr(torch, "__version__", "0.0.0-other")
    assert cpp.build_key(a, flags) != key


def test_two_checkouts_used_in_turn_build_once_then_never_again(tmp_path, fake, capsys):
    a, b = _clone(tmp_path, "a"), _clone(tmp_path, "b")
    first = cpp._load_jit(a)
    assert "compiling" in capsys.readouterr().err
    assert cpp._load_jit(b).endswith("(cached)") and cpp._load_jit(a).endswith("(cached)")
    assert "compiling" not in capsys.readouterr().err
    assert len(fake.compiles) == 1 and len({c["dir"] for c in fake.calls}) == 1
    assert first == f"JIT build {fake.calls[0]['dir']}"
    for call in fake.calls:  # the build names no checkout's path, so switching checkouts changes nothing
        assert all(str(tmp_path / "a") not in p and str(tmp_path / "b") not in p
                   for p in call["sources"] + call["include"])
        assert os.path.basename(call["dir"]) == call["name"] == f"ddf_C_{cpp.build_key(a)}"
    cpp._load_jit(_clone(tmp_path, "c", edit="\n// changed\n"))  # other sources: their own build, beside it
    assert len(fake.compiles) == 2 and len(set(fake.compiles)) == 2


def test_a_failed_build_is_reported_and_retried_next_start(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    a = _clone(tmp_path, "a")
    monkeypatch.setattr(cpp_extension, "load", FakeBuild(fail=True))
    with pytest.raises(RuntimeError, match="interrupted"):
        cpp._load_jit(a)
    build_dir = cpp.build_directory(cpp.build_key(a))
    assert not os.path.exists(os.path.join(build_dir, cpp._BUILT_MARKER))
    retry = FakeBuild()
    monkeypatch.setattr(cpp_extension, "load", retry)
    assert not cpp._load_jit(a).endswith("(cached)")
    assert retry.compiles == [build_dir]


def test_op_label_and_the_training_rule(monkeypatch):
    assert backends.op_label("cpu") == "cpp (compiled)"
    assert backends.require_compiled("cpu") == "cpp (compiled)"
    with backends.use_backend("reference"):
        assert backends.require_compiled("cpu") == "reference (slow)"
    monkeypatch.setitem(backends._CAN_RUN, "cpp", lambda d: (False, "JIT build failed (interrupted)"))
    with pytest.warns(RuntimeWarning):
        backends.choose(torch.device("cpu"))
    assert backends.op_label("cpu") == "reference (slow)"
    with pytest.raises(RuntimeError, match=r"JIT build failed \(interrupted\).*DDF_BACKEND=reference"):
        backends.require_compiled("cpu")
    with backends.use_backend("reference"):
        assert backends.require_compiled("cpu") == "reference (slow)"


def test_train_stops_when_the_compiled_kernels_are_missing_unless_reference_is_asked(tmp_path):
    """No prebuilt extension and no JIT (a failed build looks the same): train.py exits 2 with one line before
    writing anything; --ddf-backend reference gets past that check (and says so in its header)."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = ("import sys, runpy; sys.modules['ddf._C'] = None; sys.argv = ['train.py'] + sys.argv[1:]; "
            "runpy.run_path('train.py', run_name='__main__')")
    out = tmp_path / "out"
    env = dict(os.environ, DDF_JIT="0", OMP_NUM_THREADS="1")
    env.pop("DDF_BACKEND", None)
    args = ["--data-dir", str(tmp_path / "nodata"), "--output", str(out), "--device", "cpu"]
    res = subprocess.run([sys.executable, "-c", code, *args], cwd=repo, env=env, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 2, res.stderr
    err = [ln for ln in res.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "DDF_BACKEND=reference" in err[0] and "DDF_JIT=0" in err[0], res.stderr
    assert "Traceback" not in res.stderr and not out.exists()
    res = subprocess.run([sys.executable, "-c", code, *args, "--ddf-backend", "reference"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2 and "compiled DDF kernels" not in res.stderr, res.stderr  # stops later: no data


def test_no_cuda_home_warning_on_a_machine_without_cuda(tmp_path):
    """torch.utils.cpp_extension logs ``No CUDA runtime is found, using CUDA_HOME=...`` when imported with a CUDA
    toolkit but no CUDA device (issue 25 item 4): it reads like an error and does not matter to the CPU kernels, so
    the cpp backend's JIT path (loading the build, its folder) must not print it. CUDA_HOME names an existing folder
    and CUDA_VISIBLE_DEVICES is empty, so the warning would appear on any machine with a CUDA build of torch."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", PYTHONPATH=repo)
    env.pop("DDF_BACKEND", None)

    def stderr(code):
        res = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True, text=True,
                             timeout=600)
        assert res.returncode == 0, res.stderr
        return res.stdout, res.stderr

    _, control = stderr("import torch.utils.cpp_extension")
    if "No CUDA runtime is found" not in control:
        pytest.skip("this torch build does not log the CUDA_HOME warning (no CUDA build), nothing to hide")
    out, err = stderr("import sys; sys.modules['ddf._C'] = None\n"  # the JIT path, as in a source checkout
                      "from ddf.backends import cpp\n"
                      "print(cpp.load(), cpp.where() or cpp.unavailable_reason()); cpp.build_directory('k')\n"
                      "import logging; print(logging.getLogger('torch.utils.cpp_extension').level)")
    assert "No CUDA runtime is found" not in err, err
    assert out.split()[0] == "True" and "JIT build" in out, out + err  # the path that imports cpp_extension ran
    assert out.split()[-1] == "0", out  # the logger's level is put back (NOTSET)
