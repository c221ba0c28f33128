"""The command line: image I/O, the error cases of issues #12 and #22 (each run as a
subprocess: exit code 2, a one-line message, no traceback, nothing written), what a new
user tripped over (#22: missing extras, flags that cannot act, non-finite numbers, the
seed range, --version's imports) and tiny end-to-end runs. Sample-level image I/O is in
tests/test_image_io.py.

Kept fast: 32x32 images, 2-3 steps, ``--mode serial`` where the solver is not the point;
the subprocesses (each pays seconds for importing torch) start together in the background
when the module's first test runs and overlap the in-process tests.
"""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deqir_fast import cli, figures
from deqir_fast import image_io as io
from deqir_fast.models import heldout_images
from test_image_io import png16, random16

pytest.importorskip("diffusers")
pytest.importorskip("skimage")

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "deqir_fast" / "assets" / "model"


def digit(index: int = 0) -> np.ndarray:
    """A bundled held-out image as 8-bit RGB, 32x32."""
    return np.round((heldout_images()[index].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)


def listing(folder: Path) -> set:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


# -- image I/O --------------------------------------------------------------------------
def test_read_image_modes(tmp_path):
    rgb = digit()
    grey = rgb.mean(-1).astype(np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(grey).save(tmp_path / "grey.png")
    Image.fromarray((grey.astype(np.uint16) * 257)).save(tmp_path / "grey16.png")
    Image.fromarray(np.dstack([rgb, np.full(grey.shape, 9, np.uint8)])).save(tmp_path / "rgba.png")
    Image.fromarray(np.dstack([grey, grey])).save(tmp_path / "la.png")
    Image.fromarray(grey > 100).save(tmp_path / "bits.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(rgb).convert("P").save(tmp_path / "palette_t.png", transparency=0)

    base = io.read_image(tmp_path / "rgb.png")
    assert base.pixels.shape == (32, 32, 3) and base.pixels.dtype == np.float32 and not base.notes
    assert np.allclose(base.pixels, rgb / 255.0)
    g16 = io.read_image(tmp_path / "grey16.png")
    assert g16.pixels.shape == (32, 32, 1)
    assert np.allclose(g16.pixels[..., 0], grey / 255.0, atol=1e-6)        # not white
    assert "16-bit" in g16.notes[0]
    assert np.allclose(io.read_image(tmp_path / "grey.png").pixels[..., 0], grey / 255.0)
    rgba = io.read_image(tmp_path / "rgba.png")
    assert np.allclose(rgba.pixels, rgb / 255.0) and "alpha channel dropped" in rgba.notes[0]
    la = io.read_image(tmp_path / "la.png")
    assert la.pixels.shape == (32, 32, 1) and "alpha channel dropped" in la.notes[0]
    assert set(np.unique(io.read_image(tmp_path / "bits.png").pixels)) <= {0.0, 1.0}
    palette = io.read_image(tmp_path / "palette.png")
    as_rgb = np.asarray(Image.open(tmp_path / "palette.png").convert("RGB")) / 255.0
    assert palette.pixels.shape == (32, 32, 3) and np.allclose(palette.pixels, as_rgb)
    assert "alpha channel dropped" in io.read_image(tmp_path / "palette_t.png").notes[0]


def test_read_16bit_colour_keeps_all_bits(tmp_path):
    iio = pytest.importorskip("imageio.v3")
    pytest.importorskip("tifffile")
    values = (np.arange(32 * 32 * 3).reshape(32, 32, 3) * 21).astype(np.uint16)
    iio.imwrite(tmp_path / "rgb16.tif", values)
    pic = io.read_image(tmp_path / "rgb16.tif")
    assert np.abs(pic.pixels - values / 65535.0).max() < 1e-6


def test_fit_size_and_channels():
    img = np.random.default_rng(0).random((40, 60, 3)).astype(np.float32)
    assert io.fit_size(img, (32, 32), resize=True, crop=False).shape == (32, 32, 3)
    assert io.fit_size(img, (32, 32), resize=False, crop=True).shape == (32, 32, 3)
    both = io.fit_size(img, (32, 32), resize=True, crop=True)
    assert both.shape == (32, 32, 3) and both.min() >= 0 and both.max() <= 1
    assert np.array_equal(io.fit_size(img, (32, 32), False, True), img[4:36, 14:46])
    with pytest.raises(ValueError, match="--resize scales it"):
        io.fit_size(img, (32, 32), resize=False, crop=False)
    with pytest.raises(ValueError, match="smaller than the 64x64 crop"):
        io.fit_size(img, (64, 64), resize=False, crop=True)
    assert io.match_channels(img[..., :1], 3).shape == (40, 60, 3)
    assert np.allclose(io.match_channels(img, 1)[..., 0], img.mean(-1))


def test_write_all_leaves_nothing_on_failure(tmp_path):
    def boom(path):
        raise OSError("disk full")

    ok = lambda path: path.write_bytes(b"x")  # noqa: E731
    with pytest.raises(OSError, match="disk full"):
        io.write_all([(tmp_path / "new" / "deep" / "a.png", ok), (tmp_path / "b.png", boom)])
    assert listing(tmp_path) == set()
    io.write_all([(tmp_path / "new" / "a.png", ok), (tmp_path / "b.png", ok)])
    assert listing(tmp_path) == {"new", "new/a.png", "b.png"}
    umask = os.umask(0o022)
    os.umask(umask)
    assert (tmp_path / "b.png").stat().st_mode & 0o777 == 0o666 & ~umask   # not mkstemp's 0600


def test_convergence_takeaway_states_rounds():
    assert "3 to 9 rounds instead of 20" in figures.convergence_takeaway({"a": 3, "b": 9}, 20, "X")
    mixed = figures.convergence_takeaway({"a": 3, "b": 20, "c": 20}, 20, "X")
    assert "a in 3 rounds" in mixed and "the other 2 need all 20" in mixed
    compared = figures.convergence_takeaway({"a": 3, "a, J = 0 (no linearisation)": 20}, 20, "X")
    assert "every solve finishes in 3 rounds" in compared
    assert "a without the linearised scan: 20" in compared
    assert figures.frozen_front(torch.tensor([[1.0, 1, 1], [np.nan, 1, 1], [np.nan, np.nan, 1]]),
                                True) == [1, 2, 3]


# -- the error cases, each as a subprocess --------------------------------------
ERROR_CASES = {
    # name: (argv, the message's telling part, paths that must not appear)
    "device_gpu": (["restore", "clean.png", "--task", "sr4", "--device", "gpu"],
                   "unknown device 'gpu'", []),
    # /proc takes no new files, even from root (whom chmod does not stop)
    "out_read_only_location": (["restore", "clean.png", "--task", "sr4", "--simulate",
                                "--out", "/proc/deqir-fast-test.png"], "cannot write in /proc",
                               ["/proc/deqir-fast-test.png"]),
    "out_new_folder_read_only": (["restore", "clean.png", "--task", "sr4", "--simulate", "--out",
                                  "/proc/deqir-fast-test/new/x.png"], "cannot write in /proc",
                                 ["/proc/deqir-fast-test"]),
    "demo_images_0": (["demo", "--images", "0", "--out", "figs"],
                      "argument --images: must be an integer >= 1, got 0", ["figs"]),
    "out_without_extension": (["restore", "clean.png", "--task", "sr4", "--simulate",
                               "--out", "result"], "--out result has no image extension",
                              ["result"]),
    # DIR/ names a folder (tested working below); here DIR is a file
    "out_folder_is_a_file": (["restore", "clean.png", "--task", "sr4", "--simulate",
                              "--out", "taken/"], "--out taken/ is a file, not a folder", []),
    # fake_model has a real config but broken weights: the size error must come first
    "measurement_size_before_model_loads": (
        ["restore", "clean.png", "--task", "sr2", "--model", "fake_model", "--out", "o.png"],
        "takes a measurement of 16x16", ["o.png"]),
    "simulate_size_before_model_loads": (
        ["restore", "low.png", "--task", "sr2", "--simulate", "--model", "fake_model",
         "--out", "o.png"], "the model takes 32x32 images", ["o.png"]),
    "tol_negative": (["restore", "clean.png", "--task", "sr4", "--simulate", "--tol", "-1",
                      "--out", "o.png"], "argument --tol: must be a finite number >= 0, got -1",
                     ["o.png"]),
    "demo_unknown_task": (["demo", "--tasks", "sr4,nope", "--out", "figs"],
                          "unknown task 'nope'", ["figs"]),
    # issue #22: every argument is checked before the model loads
    "seed_too_large": (["restore", "clean.png", "--task", "sr4", "--simulate", "--seed",
                        "99999999999999999999", "--out", "o.png"],
                       "argument --seed: must be an integer from 0 to 2**63 - 1", ["o.png"]),
    "tol_inf": (["restore", "clean.png", "--task", "sr4", "--simulate", "--tol", "inf",
                 "--out", "o.png"], "argument --tol: must be a finite number >= 0, got inf",
                ["o.png"]),
    "out_empty": (["restore", "clean.png", "--task", "sr4", "--simulate", "--out", ""],
                  "argument --out: is empty", ["restored.png"]),
}


def make_workdir(folder: Path) -> None:
    """The inputs the error cases use."""
    folder.mkdir()
    Image.fromarray(digit()).save(folder / "clean.png")
    Image.fromarray(digit()[::2, ::2]).save(folder / "low.png")
    (folder / "taken").write_text("a file")
    shutil.copytree(BUNDLED, folder / "fake_model")
    for weights in (folder / "fake_model").glob("*.safetensors"):
        weights.write_bytes(b"broken")


def start_cli(args, cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "deqir_fast", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module", autouse=True)
def error_runs(request, tmp_path_factory):
    """Starts every error case in the background as the module's first test starts: each
    costs seconds of importing torch, which then overlaps the in-process tests. The error
    tests, last in the file, collect the results."""
    wanted = any(getattr(item, "originalname", "") == "test_error_case"
                 for item in request.session.items)
    runs = {}
    if wanted:
        base = tmp_path_factory.mktemp("cli_errors")
        for name, (argv, _, _) in ERROR_CASES.items():
            make_workdir(base / name)
            runs[name] = (start_cli(argv, base / name), base / name, listing(base / name))
    yield runs
    for proc, _, _ in runs.values():
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# -- end to end, in-process (the model loads in well under a second once imported) ------
@pytest.fixture
def images(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rgb = digit()
    Image.fromarray(rgb).save("clean.png")
    Image.fromarray(digit(1)).save("clean2.png")
    Image.fromarray(digit(2)).save("clean3.png")
    Image.fromarray(rgb[::2, ::2]).save("low.png")
    return tmp_path


def restore(*argv):
    return cli.main(["restore", *argv, "--steps", "3", "--seed", "1"])


def test_16bit_grey_restores_to_its_own_brightness(images, capsys):
    grey = digit().mean(-1)
    Image.fromarray(np.round(grey * 257).astype(np.uint16)).save("grey16.png")
    assert restore("grey16.png", "--task", "sr4", "--simulate", "--mode", "serial",
                   "--out", "r.png") == 0
    captured = capsys.readouterr()
    assert "16-bit grey" in captured.err and "grey, repeated into 3 channels" in captured.err
    out = np.asarray(Image.open("r.png"), dtype=np.float64)
    assert out.shape == (32, 32, 3)
    assert abs(out.mean() - grey.mean()) < 20            # was nearly white (issue #12)
    assert "PSNR restored" in captured.out and Path("r_compare.png").stat().st_size > 2000


def test_colorize_takes_a_grey_measurement(images, capsys):
    Image.fromarray(digit().mean(-1).astype(np.uint8)).save("grey.png")
    assert restore("grey.png", "--task", "colorize", "--mode", "serial", "--out", "c.png") == 0
    assert np.asarray(Image.open("c.png")).shape == (32, 32, 3)
    # a colour image is reduced to the grey the task measures, with a note
    assert restore("clean.png", "--task", "colorize", "--mode", "serial", "--out", "d.png") == 0
    assert "using the mean of its channels" in capsys.readouterr().err


def test_rgba_palette_resize_and_crop(images, capsys):
    big = np.asarray(Image.fromarray(digit()).resize((64, 48)))
    Image.fromarray(np.dstack([big, np.full(big.shape[:2], 200, np.uint8)])).save("wide.png")
    Image.fromarray(digit()).convert("P").save("palette.png")
    assert restore("wide.png", "--task", "inpaint_box", "--simulate", "--mode", "serial",
                   "--out", "w.png") == 2
    assert "is 48x64, but the model takes 32x32 images" in capsys.readouterr().err
    assert not Path("w.png").exists()
    for flags in (["--resize"], ["--crop"], ["--resize", "--crop"]):
        assert restore("wide.png", "--task", "inpaint_box", "--simulate", "--mode", "serial",
                       "--out", "w.png", *flags) == 0
        err = capsys.readouterr().err
        assert "alpha channel dropped" in err and "from 48x64 to 32x32" in err
    assert restore("palette.png", "--task", "denoise", "--simulate", "--mode", "serial",
                   "--out", "p.png") == 0


def test_several_inputs_batched_into_a_folder(images, capsys):
    Path("in").mkdir()
    for name in ("clean.png", "clean2.png", "clean3.png"):
        shutil.copy(name, Path("in") / name)
    # a folder, 3 images, at most 2 per solve: two solves; outputs named after the inputs
    assert restore("in", "--task", "sr2", "--simulate", "--mode", "serial", "--max-batch", "2",
                   "--out", "out/") == 0
    out = capsys.readouterr().out
    assert listing(Path("out")) == {"clean.png", "clean2.png", "clean3.png", "compare.png"}
    assert "on 3 images" in out and out.count("serial, 3 model calls") == 2 and "mean" in out
    # a glob and a file, deduplicated; several inputs need a folder
    assert restore("clean*.png", "clean.png", "--task", "sr2", "--simulate", "--out", "x.png") == 2
    assert "3 inputs need --out to name a folder" in capsys.readouterr().err
    assert restore("in/", "--task", "sr2", "--simulate", "--out", "in/") == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert restore("nothing*.png", "--task", "sr2") == 2
    assert "matches no file" in capsys.readouterr().err
    Path("empty").mkdir()
    assert restore("empty", "--task", "sr2") == 2
    assert "holds no image files" in capsys.readouterr().err
    assert listing(images) >= {"out", "in", "empty"} and not Path("restored").exists()


def test_modes_window_and_progress(images, capsys):
    # auto: the planner (its first solve on this CPU measures the cost per call)
    assert restore("low.png", "--task", "sr2", "--out", "a.png") == 0
    captured = capsys.readouterr()
    assert "planned (" in captured.out and "3 rounds" in captured.out
    assert "sr2 planned" in captured.err                  # the planned solve's progress bar
    assert np.asarray(Image.open("a.png")).shape == (32, 32, 3)
    assert restore("low.png", "--task", "sr2", "--mode", "parallel", "--window", "2",
                   "--out", "b.jpg") == 0
    captured = capsys.readouterr()
    assert "parallel," in captured.out and "sr2 parallel" in captured.err
    assert Image.open("b.jpg").format == "JPEG"


def test_optimize_init_and_verbose(images, capsys):
    assert restore("clean.png", "--task", "sr4", "--simulate", "--optimize-init", "2",
                   "--out", "o.png") == 0
    assert "initialization optimized over 2 steps" in capsys.readouterr().out
    assert restore("clean.png", "--task", "sr4", "--optimize-init", "2", "--mode", "serial") == 2
    assert "drop --mode serial" in capsys.readouterr().err
    assert restore("clean.png", "--task", "sr2", "--verbose") == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("deqir-fast: error:")


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "argument --steps: must be an integer >= 1"),
    (["--window", "0"], "argument --window: must be an integer >= 1"),
    (["--max-batch", "0"], "argument --max-batch: must be an integer >= 1"),
    (["--tol", "nan"], "argument --tol: must be a finite number >= 0"),
    (["--steps", "1001"], "the model's schedule has 1000 timesteps"),
    (["--out", "x.xyz"], "cannot write .xyz images"),
    (["--task", "sr3"], "unknown task 'sr3'"),
])
def test_argument_errors(images, capsys, argv, message):
    full = ["restore", "clean.png", "--simulate", *argv]
    if "--task" not in argv:
        full += ["--task", "sr2"]
    assert run_main(full) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert listing(images) == {"clean.png", "clean2.png", "clean3.png", "low.png"}


def run_main(argv) -> int:
    try:
        return cli.main(argv)
    except SystemExit as exc:          # argparse's own checks exit directly
        return exc.code


def test_more_input_and_output_errors(images, capsys):
    Path("junk.png").write_text("not an image")
    before = listing(images)
    for argv, message in [
        (["restore", "junk.png", "--task", "sr2"], "junk.png is not a readable image"),
        (["restore", "nope.png", "--task", "sr2"], "INPUT nope.png does not exist"),
        (["demo", "--images", "1000", "--out", "figs"], "the bundled held-out set has"),
        (["demo", "--out", "figs.png"], "looks like a file"),
    ] + ([] if torch.cuda.is_available() else [
        (["restore", "low.png", "--task", "sr2", "--device", "cuda"], "torch sees no CUDA device")
    ]):
        assert run_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    if os.geteuid() != 0:                      # chmod does not stop root
        Path("locked").mkdir()
        Path("locked").chmod(0o555)
        try:
            assert run_main(["restore", "low.png", "--task", "sr2", "--out", "locked/new/"]) == 2
            assert "cannot write in locked" in capsys.readouterr().err
        finally:
            Path("locked").chmod(0o755)
            Path("locked").rmdir()
    assert listing(images) == before
    # DIR/ with one input: DIR/INPUT-NAME.png (and the figure), the folder made at the end
    assert restore("clean.png", "--task", "sr2", "--simulate", "--mode", "serial",
                   "--out", "new/deeper/") == 0
    assert listing(Path("new")) == {"deeper", "deeper/clean.png", "deeper/compare.png"}


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "figs"
    assert cli.main(["demo", "--steps", "3", "--images", "1", "--tasks", "sr2,colorize",
                     "--out", str(out), "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "sr2" in text and "colorize" in text and "generate" in text and "PSNR" in text
    assert listing(out) == {"demo.png", "convergence.png"}
    assert all(Image.open(out / name).format == "PNG" for name in listing(out))


def test_info_version_and_help(capsys):
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    for key in ("deqir-fast", "torch", "triton", "diffusers", "cpu", "scan backends",
                "scan on cpu"):
        assert key in text
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0 and capsys.readouterr().out.strip().startswith("deqir-fast 0.")
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for name, sub in subparsers.items():
        text = sub.format_help()
        assert "``" not in text
        for action in sub._actions:
            assert action.help, f"{name} {action.option_strings or action.dest} has no help"
            if action.option_strings and action.default not in (None, False, argparse_suppress()):
                assert f"(default: {action.default}" in " ".join(text.split()), action.dest
    assert "(default: 50)" in subparsers["restore"].format_help()


def argparse_suppress():
    import argparse
    return argparse.SUPPRESS


# -- issue #22: what a new user tripped over -------------------------------------------------
def float_options():
    """(subcommand, option) for every option whose type parses "1.5" to a float."""
    parser = cli.build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    found = []
    for name, sub in subparsers.items():
        for action in sub._actions:
            if not action.option_strings or action.type is None:
                continue
            try:
                value = action.type("1.5")
            except Exception:                  # noqa: BLE001 - not a float option
                continue
            if isinstance(value, float):
                found.append((name, action.option_strings[-1]))
    return found


REQUIRED = {"restore": ["clean.png", "--task", "sr2"]}


def test_every_float_option_refuses_non_finite_numbers(capsys):
    """--tol inf, --tol nan, and the same for every other float option, including those
    bench.py declares as plain floats: one line naming the option, exit 2."""
    options = float_options()
    assert {("restore", "--tol"), ("restore", "--lr"), ("demo", "--tol"), ("bench", "--tol"),
            ("bench", "--max-load"), ("bench", "--max-wait")} <= set(options)
    for command, option in options:
        for bad in ("inf", "-inf", "nan", "1e999"):
            # --opt=VALUE: argparse would take a separate "-inf" for an option name
            assert run_main([command, *REQUIRED.get(command, []), f"{option}={bad}"]) == 2
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1, err
            assert f"argument {option}: must be a finite number" in err, err


def test_seed_is_checked_in_the_parser(images, capsys):
    """Issue #22: --seed 99999999999999999999 failed after the model loaded."""
    for bad in ("99999999999999999999", str(cli.MAX_SEED + 1), "-1"):
        assert run_main(["restore", "clean.png", "--task", "sr2", "--seed", bad]) == 2
        err = capsys.readouterr().err.strip()
        assert "argument --seed: must be an integer from 0 to 2**63 - 1" in err
        assert len(err.splitlines()) == 1
    # the largest seed, plus the offsets the draws add to it, is one torch accepts
    torch.Generator().manual_seed(cli.MAX_SEED + 10 * 1000 + cli.CHAIN_NOISE_SEED)
    assert cli.main(["restore", "clean.png", "--task", "sr2", "--simulate", "--mode", "serial",
                     "--steps", "1", "--seed", str(cli.MAX_SEED), "--out", "s.png",
                     "--quiet"]) == 0


@pytest.mark.parametrize("command, module, argv", [
    ("restore", "PIL", ["restore", "clean.png", "--task", "sr2"]),
    ("restore", "skimage", ["restore", "clean.png", "--task", "sr2", "--simulate"]),
    ("demo", "diffusers", ["demo", "--out", "figs"]),
    ("bench", "tqdm", ["bench", "--model", "gmm", "--out", "b"]),
])
def test_a_missing_extra_is_named_before_any_work(images, capsys, monkeypatch, command, module,
                                                  argv):
    """Without the extras, restore said only "No module named 'PIL'", bench "No module
    named 'tqdm'" (after starting): every command names the extra, before any work."""
    from deqir_fast import benchmark

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the missing module was reported")

    monkeypatch.setattr(benchmark, "run_benchmark", no_work)
    monkeypatch.setattr("deqir_fast.cli.restore.load_model", no_work)
    monkeypatch.setattr("deqir_fast.models.bundled_model", no_work)
    monkeypatch.setitem(sys.modules, module, None)          # import fails as if not installed
    before = listing(images)
    assert run_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"deqir-fast {command} needs" in err and cli.EXTRA_MODULES[module] in err, err
    assert f'pip install "deqir_fast[{cli.extra_for(cli.EXTRA_MODULES[module])}]"' in err
    assert listing(images) == before


def test_a_missing_module_found_late_names_the_extra(capsys, monkeypatch):
    def late(args):
        raise ModuleNotFoundError("No module named 'matplotlib'", name="matplotlib")

    monkeypatch.setitem(cli.COMMANDS, "info", late)
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err
    assert 'needs matplotlib, which is not installed: pip install "deqir_fast[' in err


def test_extras_match_the_installed_metadata():
    """The extra named in those messages is the one setup.py's extras_require lists."""
    from importlib import metadata
    try:
        requirements = metadata.requires("deqir_fast") or []
    except metadata.PackageNotFoundError:
        pytest.skip("deqir_fast is not installed (its metadata names the extras)")
    for distribution in cli.EXTRA_MODULES.values():
        extra = cli.extra_for(distribution)
        assert any(r.split(";")[0].strip().lower().startswith(distribution)
                   and f'extra == "{extra}"' in r for r in requirements), (distribution, extra)


def scan_backends_line() -> str:
    return dict(cli.backend_lines())["scan backends"]


def test_info_lists_only_usable_scan_backends(monkeypatch):
    """Issue #22: info listed triton among the scan backends while saying triton is not
    installed. Each backend is listed as usable exactly when some device can use it."""
    from deqir_fast.ops import backends

    def check():
        line = scan_backends_line()
        usable, _, unusable = line.partition("; not usable here: ")
        for name in ("torch", "native", "triton"):
            ok = any(backends.available(d)[name][0] for d in cli.devices())
            assert (name in usable) == ok and (name in unusable) == (not ok), line
        return unusable

    check()
    monkeypatch.setitem(sys.modules, "triton", None)        # as without triton
    assert "triton (triton is not installed)" in check()


def test_flags_that_cannot_act_are_reported(images, capsys):
    serial = ["--task", "sr2", "--out", "a.png", "--steps", "2"]
    # solver options with a serial run: a note naming them
    assert cli.main(["restore", "low.png", *serial, "--mode", "serial", "--window", "2",
                     "--tol", "0.1"]) == 0
    err = capsys.readouterr().err
    assert "--tol, --window set the parallel solve, which this run does not use" in err
    assert "--mode serial runs the serial sampler" in err
    # ... not with auto, whose planned solve uses them
    assert cli.main(["restore", "low.png", *serial, "--solver", "anderson"]) == 0
    assert "set the parallel solve" not in capsys.readouterr().err
    # defaults are not choices: no note for options left alone, nor in parallel mode
    assert cli.main(["restore", "low.png", *serial, "--mode", "serial"]) == 0
    assert cli.main(["restore", "low.png", *serial, "--mode", "parallel", "--window", "2"]) == 0
    assert "set the parallel solve" not in capsys.readouterr().err
    # --lr without --optimize-init
    assert cli.main(["restore", "low.png", *serial, "--mode", "serial", "--lr", "0.1"]) == 0
    assert "--lr sets the Adam step of --optimize-init" in capsys.readouterr().err
    # an option given twice: the second one counts, and a note says so
    assert cli.main(["restore", "low.png", *serial, "--mode", "serial", "--steps", "1"]) == 0
    captured = capsys.readouterr()
    assert "--steps given twice (2, then 1): using 1" in captured.err
    assert "ddrm-1" in captured.out
    # contradictions are errors, before anything is written
    before = listing(images)
    for argv, message in [
        (["--task", "sr4"], "argument --task: given twice (sr2, then sr4); give it once"),
        (["--quiet", "--verbose"], "--quiet and --verbose contradict each other"),
    ]:
        assert run_main(["restore", "low.png", *serial, *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert listing(images) == before


def test_notes_and_quiet(images, capsys):
    argv = ["restore", "low.png", "--task", "sr2", "--steps", "1", "--out", "a.png", "--mode",
            "serial", "--tol", "0.1"]
    assert cli.main(argv + ["--quiet"]) == 0
    assert capsys.readouterr().err == ""                     # --quiet hides it
    assert cli.main(argv) == 0
    assert capsys.readouterr().err.count("--tol sets the parallel solve") == 1


def test_empty_out_is_refused(images, capsys):
    """Issue #22: --out '' reported "would overwrite the input" (it meant the current
    folder)."""
    before = listing(images)
    for argv, what in [(["restore", "clean.png", "--task", "sr2", "--out", ""], "file"),
                       (["demo", "--out", ""], "folder")]:
        assert run_main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert "argument --out: is empty; name" in err and what in err, err
        assert len(err.splitlines()) == 1
    assert listing(images) == before


def test_colorize_simulated_on_a_grey_image_says_there_is_no_colour(images, capsys):
    Image.fromarray(digit().mean(-1).astype(np.uint8)).save("grey.png")
    grey_rgb = np.repeat(digit().mean(-1).astype(np.uint8)[..., None], 3, -1)
    Image.fromarray(grey_rgb).save("grey_rgb.png")
    for name in ("grey.png", "grey_rgb.png"):
        assert restore(name, "--task", "colorize", "--simulate", "--mode", "serial",
                       "--out", "c.png") == 0
        assert "so colorize has no colour to restore" in capsys.readouterr().err
    assert restore("clean.png", "--task", "colorize", "--simulate", "--mode", "serial",
                   "--out", "c.png") == 0
    assert "no colour to restore" not in capsys.readouterr().err


def test_counts_are_singular_or_plural(images, capsys):
    assert cli.main(["restore", "low.png", "--task", "sr2", "--steps", "1", "--mode", "serial",
                     "--out", "a.png", "--quiet"]) == 0
    assert "(serial, 1 model call)" in capsys.readouterr().out
    assert cli.main(["restore", "low.png", "--task", "sr2", "--steps", "2", "--mode",
                     "parallel", "--out", "a.png", "--quiet"]) == 0
    rounds, evals = re.search(r"parallel, (\d+ rounds?), (\d+ step evaluations?)\)",
                              capsys.readouterr().out).groups()
    assert rounds == cli.plural(int(rounds.split()[0]), "round")
    assert evals == cli.plural(int(evals.split()[0]), "step evaluation")
    assert [cli.plural(n, "round") for n in (0, 1, 2)] == ["0 rounds", "1 round", "2 rounds"]
    assert "finishes in 1 round instead of 20 serial steps" in figures.convergence_takeaway(
        {"a": 1}, 20, "X")
    assert "a in 1 round instead of 2 serial steps; the other 1 needs all 2" in \
        figures.convergence_takeaway({"a": 1, "b": 2}, 2, "X")


def test_16bit_colour_input_gives_16bit_output_where_the_format_can(images, capsys):
    values = (digit().astype(np.uint16) * 257) ^ random16((32, 32, 3)) % 256   # low bytes
    png16("rgb16.png", values)
    assert restore("rgb16.png", "--task", "denoise", "--simulate", "--mode", "serial",
                   "--out", "r.tif") == 0
    err = capsys.readouterr().err
    assert "rgb16.png: 16-bit colour" in err
    tifffile = pytest.importorskip("tifffile")
    assert tifffile.imread("r.tif").dtype == np.uint16
    assert restore("rgb16.png", "--task", "denoise", "--simulate", "--mode", "serial",
                   "--out", "r.png") == 0
    assert "r.png: written at 8 bits from a 16-bit input" in capsys.readouterr().err
    assert Image.open("r.png").mode == "RGB"


def test_version_and_help_import_neither_torch_nor_numpy():
    """`deqir-fast --version` took 3.5 s importing torch: the top level imports only the
    standard library (the subcommands' options are built when chosen)."""
    code = ("import sys\n"
            "from deqir_fast import cli\n"
            "for argv in (['--version'], ['--help']):\n"
            "    try:\n"
            "        cli.main(argv)\n"
            "    except SystemExit as exc:\n"
            "        assert exc.code == 0, exc.code\n"
            "heavy = [m for m in ('torch', 'numpy', 'deqir_fast.api') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "deqir-fast 0." in proc.stdout and "COMMAND" in proc.stdout


def test_convergence_legend_covers_no_curve():
    """The legend sat inside the left panel, over the curves: it is outside both axes."""
    nan = float("nan")
    traces = {f"task {k}": {"residuals": torch.tensor([[1.0] * 6, [nan] * k + [0.1] * (6 - k),
                                                       [nan] * 5 + [1e-3]]), "converged": True}
              for k in range(1, 6)}
    fig = figures.convergence_figure(traces, 0.01, "X-6")
    renderer = fig.canvas.get_renderer()
    legends = fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    assert legends
    for legend in legends:
        box = legend.get_window_extent(renderer)
        for ax in fig.axes:
            assert not box.overlaps(ax.get_window_extent(renderer))
    import matplotlib.pyplot as plt
    plt.close(fig)


@pytest.mark.parametrize("name", sorted(ERROR_CASES))
def test_error_case(name, error_runs):
    proc, workdir, before = error_runs[name]
    _, fragment, absent = ERROR_CASES[name]
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr                        # one line: no traceback, no bar
    assert "error:" in lines[0] and fragment in lines[0], lines[0]
    assert "Traceback" not in stderr and "\r" not in stderr
    assert stdout == ""
    assert listing(workdir) == before                     # nothing written, no folders
    for path in absent:
        assert not (workdir / path).exists()
