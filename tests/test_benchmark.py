"""`deqir-fast bench` (deqir_fast/benchmark/, deqir_fast/cli/bench.py, telemetry.py) on tiny
configurations: the JSON has every field, the plots are written, and parity errors are
reported, not hidden."""
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import deqir_fast as dq
from deqir_fast import benchmark as bench
from deqir_fast import telemetry
from deqir_fast.cli import main

pytest.importorskip("diffusers")
pytest.importorskip("matplotlib")

TINY = ["--model", "gmm", "--gmm-size", "8", "--chains", "DDIM,DDRM", "--steps", "6",
        "--repeats", "1", "--quiet"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    code = main(["bench", *TINY, "--batch", "1,2", "--peers", "deqir_fast,ParaDiGMS",
                 "--out", str(out)])
    return code, out


def test_the_report_has_every_field(tiny_run, capsys):
    code, out = tiny_run
    assert code == 0
    data = json.loads((out / "bench.json").read_text())
    runs, loops, meta = data["runs"], data["loops"], data["meta"]
    assert len(runs) == 2 * 2 * 3                    # chains x batches x (serial + 2 peers)
    for r in runs:
        assert set(r) == set(bench.RUN_FIELDS)
        assert r["wall_s"] > 0 and len(r["wall_s_runs"]) == 1
        assert r["call_s"] > 0 and r["batched_call_s"] > 0 and r["window"] == 6
        assert r["projected_s"] > 0 and r["ideal_s"] > 0
        assert r["peak_mem_mb"] > 0 and r["mem_kind"]
        assert r["model_s"] > 0 and r["overhead_s"] is not None
        assert all(r[k] is None for k in telemetry.GPU_FIELDS)      # no GPU here
        if r["method"] == "serial":
            assert r["nfe"] == 6 and r["max_abs_err"] == 0
            continue
        assert r["rounds"] >= 1 and r["nfe"] >= r["rounds"] and r["converged"] is True
        assert r["parity_ok"] is True and r["parity"] == "ok"
        assert r["max_abs_err"] <= bench.GREY
        assert len(r["residuals"]) == r["rounds"]
        assert r["settings"]["solver"] in ("picard", "anderson", "triangular_anderson")
    assert len(loops) == 2
    for r in loops:
        assert set(r) == set(bench.LOOP_FIELDS)
        assert r["diffusers_s"] > 0 and r["ours_s"] > 0 and r["ratio"] > 0
        assert r["parity_ok"] is True and r["max_abs_diff"] < 1e-3
    assert meta["nvml"]["available"] is False and meta["nvml"]["reason"]
    assert meta["command"].startswith(("deqir-fast bench", "OMP_NUM_THREADS="))
    assert "cannot win wall time" in meta["cpu_note"] or "per-call overhead" in meta["cpu_note"]
    assert data["failures"] == []
    md = (out / "bench.md").read_text()
    assert "## Measured: serial vs parallel" in md and "## Projected" in md
    assert "No NVML readings" in md and "**FAIL**" not in md
    assert "deqir-fast bench --model gmm" in md                  # the command beside the numbers


def test_the_plots_are_images(tiny_run):
    import matplotlib.image as mpimg
    _, out = tiny_run
    for name in ("bench_time.png", "bench_rounds.png", "bench_residuals.png"):
        pixels = mpimg.imread(out / name)
        assert pixels.shape[0] > 400 and pixels.shape[1] > 600


def test_the_planner_is_a_method_with_its_plot(tmp_path):
    """``--peers deqir_fast-auto``: the planned solve's row (its windows and measured cost
    curve, the projection from each round's call size) and bench_planner.png."""
    import matplotlib.image as mpimg
    code = main(["bench", *TINY, "--batch", "1", "--peers", "deqir_fast-auto", "--no-loops",
                 "--out", str(tmp_path)])
    assert code == 0
    runs = json.loads((tmp_path / "bench.json").read_text())["runs"]
    planned = [r for r in runs if r["method"] == "deqir_fast-auto"]
    assert len(planned) == 2
    for r in planned:
        assert r["parity_ok"] is True and r["converged"] is True
        assert len(r["plan_windows"]) == r["rounds"] and r["plan_curve"]
        assert all(float(t) > 0 for t in r["plan_curve"].values())
        assert r["projected_s"] > 0
    assert all(r["plan_windows"] is None for r in runs if r["method"] == "serial")
    pixels = mpimg.imread(tmp_path / "bench_planner.png")
    assert pixels.shape[0] > 400 and pixels.shape[1] > 600


def test_a_speed_only_model_skips_the_planner():
    notes = []
    cfg = bench.BenchConfig(model="random64", random_channels=(8, 8, 8, 8), chains=["DDIM"],
                            steps=[3], batches=[1], peers=["deqir_fast", "deqir_fast-auto"],
                            repeats=0, loops=False)
    report = bench.run_benchmark(cfg, note=notes.append)
    assert {r["method"] for r in report["runs"]} == {"serial", "deqir_fast"}
    assert any("deqir_fast-auto skipped" in n for n in notes)


class BatchDependent(torch.nn.Module):
    """A model that answers differently in a batched call than in a serial one (as a
    network with batch statistics would): the parallel solve then converges to another
    chain's result, which the benchmark must report."""

    def __init__(self, inner, batch):
        super().__init__()
        self.inner, self.batch = inner, batch

    def forward(self, x, t):
        eps = self.inner(x, t)
        return eps + 0.2 if x.shape[0] > self.batch else eps


def test_a_model_that_differs_in_parallel_is_reported():
    cfg = bench.BenchConfig(model="gmm", gmm_size=8, chains=["DDIM"], steps=[6], batches=[1],
                            peers=["deqir_fast"], repeats=1, loops=False)
    good = bench.load_model(cfg)
    bad = dataclasses.replace(good, model=BatchDependent(good.model, 1))
    report = bench.run_benchmark(cfg, bench_model=bad)
    row = next(r for r in report["runs"] if r["method"] == "deqir_fast")
    assert row["parity_ok"] is False and row["max_abs_err"] > bench.GREY
    assert row["parity"].startswith("FAIL") and "2/255" in row["parity"]
    assert report["ours_failed"] and len(report["failures"]) == 1
    md = bench.markdown(report)
    assert "**FAIL**" in md and report["failures"][0] in md


def test_a_wrong_solve_fails_the_command(tmp_path, monkeypatch, capsys):
    real = dq.solve

    def wrong(*args, **kwargs):
        res = real(*args, **kwargs)
        return dataclasses.replace(res, x0=res.x0 + 0.05, converged=False)

    monkeypatch.setattr(dq, "solve", wrong)
    code = main(["bench", *TINY, "--chains", "DDIM", "--peers", "deqir_fast", "--no-loops",
                 "--no-plots", "--out", str(tmp_path)])
    assert code == 1
    err = capsys.readouterr().err
    assert "parity failure" in err and "not converged" in err
    data = json.loads((tmp_path / "bench.json").read_text())
    row = next(r for r in data["runs"] if r["method"] == "deqir_fast")
    assert row["parity_ok"] is False and row["converged"] is False
    assert abs(row["max_abs_err"] - 0.05) < 1e-3
    assert "**FAIL**" in (tmp_path / "bench.md").read_text()


def test_bad_arguments_fail_early(tmp_path, capsys):
    assert main(["bench", "--model", "gmm", "--peers", "Nobody", "--out", str(tmp_path)]) == 2
    assert "unknown peer" in capsys.readouterr().err
    assert main(["bench", "--model", "gmm", "--chains", "DDXM", "--out", str(tmp_path)]) == 2
    assert main(["bench", "--model", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    capsys.readouterr()
    # photo16 is not installed with the package: the error says where it is
    assert main(["bench", "--model", "photo16", "--out", str(tmp_path)]) == 2
    assert "bench/models/photo16" in capsys.readouterr().err


def test_bench_needs_nothing_outside_the_package(tmp_path):
    """`pip install .` installs the package and nothing of bench/: the package copied alone
    into an empty folder (no bench/ beside it, the source tree off the path) runs a real
    bench on the bundled model, whose chains and model come from deqir_fast.calibration.
    Its report names no git commit: the copy is not a checkout, though a repository
    surrounds it."""
    source = Path(dq.__file__).resolve().parent
    # installed as into a venv that sits inside some git repository (as .venv in a checkout)
    site = tmp_path / "site"
    shutil.copytree(source, site / "deqir_fast", ignore=shutil.ignore_patterns("__pycache__"))
    git = shutil.which("git")
    if git:
        for args in (["init", "-q"], ["-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                                      "--allow-empty", "-m", "other repository"]):
            subprocess.run([git, "-C", str(tmp_path), *args], check=True, capture_output=True)
    out = tmp_path / "out"
    # modules loaded from the source tree's package or bench/ (its venv may sit beside them)
    tree = (str(source) + os.sep, str(source.parent / "bench") + os.sep)
    code = (
        "import sys, deqir_fast\n"
        f"assert deqir_fast.__file__.startswith({str(site)!r}), deqir_fast.__file__\n"
        "from deqir_fast.cli import main\n"
        "code = main(['bench', '--model', 'bundled', '--chains', 'DDRM,DDNM', '--steps', '2', "
        "'--peers', 'deqir_fast', '--repeats', '0', '--no-loops', '--no-plots', '--quiet', "
        f"'--out', {str(out)!r}])\n"
        "stray = [m.__file__ for m in list(sys.modules.values())\n"
        f"         if (getattr(m, '__file__', None) or '').startswith({tree!r})]\n"
        "assert not stray, stray\n"
        "sys.exit(code)\n")
    env = dict(os.environ, PYTHONPATH=str(site), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / "bench.json").read_text())
    assert data["meta"]["model"] == "bundled" and data["failures"] == []
    assert data["meta"]["git"] is None          # not the commit of the repository around it
    ours = [r for r in data["runs"] if r["method"] == "deqir_fast"]
    assert [r["chain"] for r in ours] == ["DDRM", "DDNM"]
    assert all(r["parity_ok"] and r["max_abs_err"] <= bench.GREY for r in ours)


# -- telemetry --------------------------------------------------------------------------------
def test_peak_memory_on_cpu():
    with telemetry.PeakMemory("cpu") as m:
        block = torch.ones(16 * 2 ** 20)             # 64 MiB
        block += 1
    assert m.peak_mb > 0 and m.kind.startswith("rss")
    if m.kind == "rss":
        assert m.added_mb > 40


def test_no_nvml_on_cpu_is_reported_not_raised():
    status = telemetry.nvml_status("cpu")
    assert status["available"] is False and "cpu" in status["reason"]
    with telemetry.GpuMonitor("cpu") as g:
        pass
    assert g.available is False and all(v is None for v in g.summary().values())


class _Error(Exception):
    pass


def fake_pynvml(init_fails=False, energy=True):
    """A stand-in for nvidia-ml-py: a GPU at 40% SM, 100 W, using 1 GiB, whose energy
    counter advances 5 J per reading."""
    m = types.ModuleType("pynvml")
    m.NVMLError = _Error
    counter = {"mj": 0.0}

    def init():
        if init_fails:
            raise _Error("Driver Not Loaded")

    def total_energy(h):
        if not energy:
            raise _Error("Not Supported")
        counter["mj"] += 5000.0
        return counter["mj"]

    m.nvmlInit = init
    m.nvmlDeviceGetHandleByPciBusId = lambda bus: "handle"
    m.nvmlDeviceGetHandleByIndex = lambda i: "handle"
    m.nvmlDeviceGetName = lambda h: b"Fake GPU"
    m.nvmlDeviceGetMemoryInfo = lambda h: types.SimpleNamespace(used=2 ** 30)
    m.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=40)
    m.nvmlDeviceGetPowerUsage = lambda h: 100_000               # mW
    m.nvmlDeviceGetTotalEnergyConsumption = total_energy
    return m


@pytest.fixture
def nvml(monkeypatch):
    def install(**kw):
        monkeypatch.setitem(sys.modules, "pynvml", fake_pynvml(**kw))
        monkeypatch.setattr(telemetry, "_NVML", {})
    yield install
    telemetry._NVML.clear()


def test_nvml_error_without_a_driver_is_reported(nvml):
    nvml(init_fails=True)
    status = telemetry.nvml_status("cuda:0")
    assert status["available"] is False and "Driver Not Loaded" in status["reason"]
    with telemetry.GpuMonitor("cuda:0") as g:
        pass
    assert g.summary()["energy_j"] is None


@pytest.mark.parametrize("energy", [True, False])
def test_gpu_readings_from_nvml(nvml, energy):
    nvml(energy=energy)
    with telemetry.GpuMonitor("cuda:0", interval=0.001) as g:
        time.sleep(0.03)
    s = g.summary()
    assert g.available and s["samples"] >= 2
    assert s["gpu_mem_used_mb"] == 1024 and s["sm_util_mean"] == 40 and s["power_max_w"] == 100
    if energy:
        assert s["energy_source"] == "counter" and s["energy_j"] == 5.0
    else:
        duration = g._t1 - g._t0                     # 100 W over the block, integrated
        assert s["energy_source"] == "power integrated"
        assert 0.5 * 100 * duration < s["energy_j"] <= 100 * duration * 1.001
    per_image = bench._gpu_summary([s, s], batch=4)
    assert per_image["energy_per_image_j"] == pytest.approx(s["energy_j"] / 4)
