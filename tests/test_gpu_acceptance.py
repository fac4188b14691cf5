"""tools/gpu_acceptance.py: report files, time boxes, --out safety; the full --dry-run runs in .ci/run."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "gpu_acceptance.py")
sys.path.insert(0, ROOT)

from tools.acceptance import PHASES  # noqa: E402
from tools.acceptance import correctness  # noqa: E402


def _run(*args, env=None):
    e = dict(os.environ, PYTHONPATH=ROOT, **(env or {}))
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=e, timeout=300)


def _report(out):
    with open(os.path.join(out, "gpu_acceptance.json")) as f:
        return {p["name"]: p for p in json.load(f)["phases"]}


def test_dry_run_writes_every_phase_with_a_status(tmp_path):
    out = str(tmp_path / "acc")
    proc = _run("--dry-run", "--out", out, "--phases", "env,sanitizer")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    phases = _report(out)
    assert list(phases) == list(PHASES)
    assert phases["env"]["status"] == "pass" and phases["env"]["tables"]
    assert phases["sanitizer"]["status"] == "skipped" and "needs a GPU" in phases["sanitizer"]["reason"]
    assert "ok: 6 cases" in phases["sanitizer"]["reason"]  # the target program ran in the interpreter
    assert all(phases[n]["reason"] == "not in --phases" for n in ("correctness", "speed", "training"))
    md = open(os.path.join(out, "gpu_acceptance.md")).read()
    assert "| env | pass |" in md and "dry run" in md


def test_a_hung_phase_is_killed_at_its_time_box_and_the_next_still_runs(tmp_path):
    out = str(tmp_path / "acc")
    proc = _run("--dry-run", "--out", out, "--phases", "env,sanitizer", "--time-box", "env=8",
                env={"DDF_ACCEPTANCE_TEST_HANG": "env"})
    assert proc.returncode == 0, proc.stdout + proc.stderr  # env does not gate the exit status
    phases = _report(out)
    assert phases["env"]["status"] == "fail" and "timed out after 8 s" in phases["env"]["detail"]
    assert phases["env"]["seconds"] < 30
    assert phases["sanitizer"]["status"] == "skipped"


def test_a_failed_gating_phase_makes_the_exit_status_non_zero(tmp_path):
    out = str(tmp_path / "acc")
    proc = _run("--dry-run", "--out", out, "--phases", "sanitizer", "--time-box", "sanitizer=5",
                env={"DDF_ACCEPTANCE_TEST_HANG": "sanitizer"})
    assert proc.returncode == 1
    assert _report(out)["sanitizer"]["status"] == "fail"


def test_out_folder_of_a_user_is_refused_and_kept(tmp_path):
    mine = tmp_path / "mine.txt"
    mine.write_text("keep")
    proc = _run("--dry-run", "--out", str(tmp_path), "--phases", "env")
    assert proc.returncode == 2 and "holds files this command did not write" in proc.stderr
    assert mine.read_text() == "keep" and not (tmp_path / "gpu_acceptance.json").exists()


@pytest.mark.parametrize("bad", ["--phases=env,nope", "--time-box=env", "--time-box=env=-1", "--time-box=x=3"])
def test_bad_options_are_one_line(tmp_path, bad):
    proc = _run("--dry-run", "--out", str(tmp_path / "acc"), bad)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("gpu_acceptance.py: error: --")


def test_the_op_sweep_covers_every_variant_axis():
    seen = {(c["dtype"], c["cl"], c["comb"], c["k"]) for c in correctness.cases(dry_run=True)}
    assert len(seen) == 4 * 2 * 2 * 4
    extra = [c for c in correctness.cases(dry_run=True) if (c["s"], c["d"], c["head"], c["norm"]) != (1, 1, 1, False)]
    assert {c["s"] for c in extra} >= {2} and {c["d"] for c in extra} >= {2} and {c["head"] for c in extra} >= {2, 4}
    assert any(c["norm"] for c in extra)


def test_sweep_cases_not_finished_in_the_time_box_are_failures_and_the_workers_stop(monkeypatch):
    import time

    from tools.acceptance.common import Context

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the spawned workers run the kernels in the interpreter
    ctx = Context(out="unused", dry_run=True, deadline=time.time() + 31)  # 1 s for the sweep: spawning alone is more
    t0 = time.time()
    failed, n, t = correctness.op_sweep(ctx)
    assert time.time() - t0 < 30
    assert n == len(correctness.cases(True)) and failed >= n - 2
    assert sum(r[-1] == "FAIL (not run: time box)" for r in t["rows"]) >= n - 2


def test_the_report_is_on_disk_after_each_phase_even_when_the_command_is_killed(tmp_path):
    import signal
    import time

    out = str(tmp_path / "acc")
    env = dict(os.environ, PYTHONPATH=ROOT, DDF_ACCEPTANCE_TEST_HANG="sanitizer")
    proc = subprocess.Popen([sys.executable, SCRIPT, "--dry-run", "--out", out, "--phases", "env,sanitizer"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not os.path.exists(os.path.join(out, "logs", "sanitizer.log")):
            time.sleep(0.5)
        time.sleep(1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    phases = _report(out)
    assert phases["env"]["status"] == "pass"
    assert phases["sanitizer"]["status"] == "skipped" and "not reached" in phases["sanitizer"]["reason"]
