#!/usr/bin/env python
"""Mutation check: plant one plausible solver bug at a time in a copy of the repository
and run the test suite there; a mutant is *caught* when the suite fails.

    python scripts/mutation_check.py                 # every mutant, table to stdout
    python scripts/mutation_check.py --list          # ids and descriptions
    python scripts/mutation_check.py --only freeze-ratio,ring-slot --keep
    python scripts/mutation_check.py --baseline      # the unmutated copy must pass first
    python scripts/mutation_check.py --json out.json --jobs 2
    python scripts/mutation_check.py --from-head --overlay tests,scripts   # HEAD + your tests

Each mutant is a text substitution (``old`` -> ``new``) in one file; ``old`` must occur
exactly once (or ``count`` times), so a mutant that no longer matches the code fails
loudly instead of silently testing nothing. The copy holds the working tree's tracked
and untracked-but-not-ignored files plus the built native library
(deqir_fast/_native_kernels*.so); a mutant in kernels/ rebuilds that library in the copy
with CMake (about 30 s on 2 cores) and replaces the copy's. The suite runs as
``python -m pytest -q -x -p no:cacheprovider`` in the copy with PYTHONPATH set to it
(the script checks that the copy imports its own deqir_fast). Needs the project's venv.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    id: str
    what: str                 # the planted bug, in words
    file: str                 # relative to the repository root
    old: str
    new: str
    count: int = 1            # occurrences of ``old`` replaced (all must exist)
    first: tuple = ()         # test files to run before FIRST (where the catching test is)

    @property
    def extra(self) -> bool:
        """Only run with --all (each uncaught mutant costs a full suite run, 1.5-4 min)."""
        return self.id in EXTRA


SOLVERS_T, DIST_T, WEIGHTS_T = ("tests/test_solvers.py",), ("tests/test_distributed.py",), \
    ("tests/test_residual_weights.py",)
CLI_T, IO_T = ("tests/test_cli.py",), ("tests/test_image_io.py",)
DIFF_T, SCHED_T = ("tests/test_dropin_diffusers.py",), ("tests/test_schedules.py",)
BENCH_T, README_T = ("tests/test_benchmark.py",), ("tests/test_readme.py",)

# Issue #22 (2026-12-07): each planted by hand first and seen caught by the test named in
# tests/README.md; ``first`` runs that test's file first.
ISSUE_22 = [
    # -- the serial shadow: which frozen states it compares, and after a restart ----------------
    Mutant("shadow-skips-carry", "the shadow skips the state a window carries (lo - 1)",
           "deqir_fast/solvers/loop.py", '        compare = p < lo      #',
           '        compare = p < lo - 1      #', first=SOLVERS_T),
    Mutant("shadow-skips-carry-device", "check_every: the shadow skips the carried state",
           "deqir_fast/solvers/loop.py", 'frozen = [p0 + q < self.lo + int(rec.frozen[q]) for q',
           'frozen = [p0 + q < self.lo + int(rec.frozen[q]) - 1 for q', first=SOLVERS_T),
    Mutant("shadow-unfrozen-device", "check_every: the shadow compares the first unfrozen state",
           "deqir_fast/solvers/loop.py", 'frozen = [p0 + q < self.lo + int(rec.frozen[q]) for q',
           'frozen = [p0 + q <= self.lo + int(rec.frozen[q]) for q', first=SOLVERS_T),
    Mutant("shadow-skips-carry-sharded", "sharded: the shadow skips the carried state",
           "deqir_fast/distributed.py", 'if shadow is not None and p < loop.lo and int(self.final_owner[p]) == me',
           'if shadow is not None and p < loop.lo - 1 and int(self.final_owner[p]) == me', first=DIST_T),
    Mutant("restart-keeps-secant-rounds", "a shadow restart keeps the secant's round history",
           "deqir_fast/solvers/policy.py", "    stats.serial_mismatch = step\n    lin.forget_rounds()\n",
           "    stats.serial_mismatch = step\n", first=SOLVERS_T),
    Mutant("forget-rounds-noop", "Linearization.forget_rounds forgets nothing",
           "deqir_fast/linearize.py", "            self._seen.zero_()", "            pass",
           first=SOLVERS_T),
    Mutant("derived-span-in-steps", "DDNM's derived-weight span counted in steps (ceil(S/100)), "
           "not timesteps", "deqir_fast/system.py",
           '        k = torch.searchsorted(-t, -t + span, side="left")',
           "        k = (torch.arange(S) + int(DERIVED_SPAN * S + 0.999)).clamp(max=S)",
           first=WEIGHTS_T),
    # -- a sharded solve's teardown -------------------------------------------------------------
    Mutant("shard-result-holds-group", "a sharded result holds its process group strongly",
           "deqir_fast/distributed.py", "        self._group = weakref.ref(cfg.group)\n",
           "        self._group, self._held = weakref.ref(cfg.group), cfg.group\n", first=DIST_T),
    Mutant("shard-config-mutated", "resolve writes the default group into the caller's ShardConfig",
           "deqir_fast/distributed.py",
           "    group = dist.group.WORLD if cfg.group is None else cfg.group\n",
           "    group = cfg.group = dist.group.WORLD if cfg.group is None else cfg.group\n",
           first=DIST_T),
    Mutant("example-cuda-unchecked", "examples/sharded_solve.py --device cuda without a GPU: "
           "a traceback", "examples/sharded_solve.py",
           'if args.device == "cuda" and not torch.cuda.is_available():', "if False:",
           first=DIST_T),
    # -- drop-in edges (diffusers) --------------------------------------------------------------
    Mutant("trailing-msg-says-fail", "the overshooting-trailing message claims diffusers would fail",
           "deqir_fast/diffusers_compat.py",
           'f"{setting} {what}. diffusers runs them without an error, but wrongly: at a "',
           'f"{setting} {what}; diffusers would fail on them too. At a "', first=DIFF_T),
    Mutant("subclass-override-ignored", "a DDIMScheduler subclass overriding step is stepped as plain DDIM",
           "deqir_fast/diffusers_compat.py",
           "changed = [m for m in methods if any(m in vars(c) for c in above) or m in own]",
           "changed = []", first=DIFF_T),
    Mutant("subclass-only-step-checked", "only an override of step is refused",
           "deqir_fast/diffusers_compat.py",
           'STEPPING_METHODS = ("set_timesteps", "scale_model_input", "step", "_get_variance",',
           'STEPPING_METHODS = ("step", "_get_variance",', first=DIFF_T),
    Mutant("ddim-accepts-laplace", "a DDIMScheduler config accepts every beta_schedule DDPMScheduler does",
           "deqir_fast/diffusers_compat.py", "accepted = BETA_SCHEDULES.get(kind, ALL_BETA_SCHEDULES)",
           "accepted = ALL_BETA_SCHEDULES", first=DIFF_T),
    Mutant("beta-msg-lists-other", "the beta_schedule message lists another set than the one accepted",
           "deqir_fast/diffusers_compat.py",
           "f\"{', '.join(map(repr, accepted))} (or pass trained_betas)\")",
           "f\"{', '.join(map(repr, ALL_BETA_SCHEDULES))} (or pass trained_betas)\")", first=DIFF_T),
    Mutant("v-eps-chain", "v_prediction steps with the eps chain's coefficients",
           "deqir_fast/diffusers_compat.py", "        return A - Q * csb, Q",
           "        return c_x0 / sa + c_x, c_eps - c_x0 * sb / sa", first=DIFF_T),
    Mutant("sample-eps-chain", "sample prediction steps with the eps chain's coefficients",
           "deqir_fast/diffusers_compat.py", "        return A - Q / csb, Q",
           "        return c_x0 / sa + c_x, c_eps - c_x0 * sb / sa", first=DIFF_T),
    Mutant("zero-snr-refuse-all", "rescale_betas_zero_snr refused for every spacing, leading too",
           "deqir_fast/diffusers_compat.py",
           'if not cfg["rescale_betas_zero_snr"] or int(ts.max()) != T - 1:',
           'if not cfg["rescale_betas_zero_snr"]:', first=DIFF_T),
    Mutant("zero-snr-no-refusal", "zero-SNR steps at alpha-bar = 0 not refused",
           "deqir_fast/diffusers_compat.py",
           'if not cfg["rescale_betas_zero_snr"] or int(ts.max()) != T - 1:', "if True:",
           first=DIFF_T),
    Mutant("zero-snr-config-unscaled", "a config's rescale_betas_zero_snr ignored (alpha-bar not rescaled)",
           "deqir_fast/diffusers_compat.py", "        betas = _rescale_zero_terminal_snr(betas)",
           "        betas = betas", first=DIFF_T),
    Mutant("zero-alpha-timestep-allowed", "a chain may run the model at a timestep with alpha-bar = 0",
           "deqir_fast/schedules.py", "    if bool(zero.any()):", "    if False:", first=SCHED_T),
    Mutant("v-conversion-sign", "the v_prediction conversion to eps has the wrong sign on x",
           "deqir_fast/diffusers_compat.py",
           "    return sa * out + s1 * x                                     # v_prediction",
           "    return sa * out - s1 * x                                     # v_prediction",
           first=DIFF_T),
    # -- the CLI and image files ----------------------------------------------------------------
    Mutant("io-truncate", "image saving truncates to the level below instead of rounding",
           "deqir_fast/image_io.py", "return np.rint(scaled).astype(", "return np.floor(scaled).astype(",
           first=IO_T),
    Mutant("io-16bit-colour-read", "16-bit RGB read from the high byte only", "deqir_fast/image_io.py",
           '_OTHER_BYTE = {"RGB;16B": "RGB;16L",', '_OTHER_BYTE = {"RGB;16B": "RGB;16B",', first=IO_T),
    Mutant("cli-16bit-output", "a 16-bit input always written at 8 bits", "deqir_fast/cli/restore_files.py",
           "        keep = depth > 8 and io.can_write_16bit(fmt, channels)", "        keep = False",
           first=CLI_T),
    Mutant("cli-float-inf", "--tol accepts inf", "deqir_fast/cli/options.py",
           "non_negative_float = _checked(float, lambda v: math.isfinite(v) and v >= 0,",
           "non_negative_float = _checked(float, lambda v: v >= 0,", first=CLI_T),
    Mutant("cli-bench-floats", "plain float options (bench --max-load/--max-wait) accept inf/nan",
           "deqir_fast/cli/options.py", "            action.type = finite_float", "            pass",
           first=CLI_T),
    Mutant("cli-seed-range", "--seed has no upper bound (overflow after the model loads)",
           "deqir_fast/cli/options.py", "seed_int = _checked(int, lambda v: 0 <= v <= MAX_SEED,",
           "seed_int = _checked(int, lambda v: 0 <= v,", first=CLI_T),
    Mutant("cli-extras-precheck", "missing optional modules not checked before work",
           "deqir_fast/cli/__init__.py", "        check_modules(args)\n", "        pass\n", first=CLI_T),
    Mutant("cli-extras-late", "a late ModuleNotFoundError does not name the extra", "deqir_fast/cli/__init__.py",
           '        if top in EXTRA_MODULES and "pip install" not in str(exc):', "        if False:",
           first=CLI_T),
    Mutant("cli-info-triton", "info lists triton as a usable scan backend whatever its state",
           "deqir_fast/cli/info.py", "            if ok:\n                break",
           '            if ok or name == "triton":\n                break', first=CLI_T),
    Mutant("cli-serial-flags", "solver flags with a serial run ignored silently", "deqir_fast/cli/restore.py",
           '    if mode == "serial" and unused:', "    if False:", first=CLI_T),
    Mutant("cli-task-twice", "--task given twice keeps the last silently", "deqir_fast/cli/parser.py",
           "            if self.dest in self.REFUSED_TWICE:", "            if False:", first=CLI_T),
    Mutant("cli-quiet-verbose", "--quiet --verbose accepted", "deqir_fast/cli/parser.py",
           '    if getattr(args, "quiet", False) and getattr(args, "verbose", False):', "    if False:",
           first=CLI_T),
    Mutant("cli-lr-note", "--lr without --optimize-init ignored silently", "deqir_fast/cli/restore.py",
           '    if "lr" in given_options(args) and not args.optimize_init:', "    if False:",
           first=CLI_T),
    Mutant("cli-empty-out", "--out '' taken as the current folder", "deqir_fast/cli/parser.py",
           '    if getattr(args, "out", None) == "":', "    if False:", first=CLI_T),
    Mutant("cli-colorize-grey", "simulated colorize on a grey image gives no warning",
           "deqir_fast/cli/restore_files.py",
           '        if args.simulate and args.task == "colorize" and _is_grey(pixels):',
           "        if False:", first=CLI_T),
    Mutant("cli-eager-torch", "cli imports the maths (torch) at module level",
           "deqir_fast/cli/parser.py", 'from .. import __version__\n',
           'from .. import __version__, api  # noqa: F401\n', first=CLI_T),
    Mutant("figures-plural", "counts always plural ('1 rounds')", "deqir_fast/figures.py",
           "    return f\"{count} {word if count == 1 else (words or word + 's')}\"",
           "    return f\"{count} {words or word + 's'}\"", first=CLI_T),
    Mutant("figures-legend-inside", "convergence legend over the panels", "deqir_fast/figures.py",
           "bbox_to_anchor=(0.5, bottom)", "bbox_to_anchor=(0.5, 0.5)", first=CLI_T),
    # -- packaging and the README ---------------------------------------------------------------
    Mutant("bench-calibrate-from-tree", "deqir-fast bench loads its models through the source tree's "
           "bench/calibrate.py (missing after pip install .)", "deqir_fast/benchmark/models.py",
           "        model, schedule, images = calibration.load(name)",
           "        import runpy; model, schedule, images = runpy.run_path(str(Path(__file__)"
           ".resolve().parents[2] / \"bench\" / \"calibrate.py\"))[\"load\"](name)", first=BENCH_T),
    Mutant("bench-git-of-surrounding-repo", "bench records the commit of any git repository around "
           "an installed copy", "deqir_fast/benchmark/record.py",
           '    if not (root / ".git").exists():\n        return None\n', "", first=BENCH_T),
    Mutant("readme-grad-measurement-loss", "README gradient example on ||A x0 - y||^2 (x_T.grad == 0)",
           "README.md", "loss = (res.x0 - reference).pow(2).sum()",
           "loss = (op.A(res.x0) - chain.y).pow(2).sum()", first=README_T),
    Mutant("readme-silent-block", "a README block prints nothing", "README.md",
           'print(f"{res.iterations} rounds for {len(sigmas) - 1} steps',
           'str(f"{res.iterations} rounds for {len(sigmas) - 1} steps', first=README_T),
    Mutant("setup-numpy-warning-shown", "setup.py lets torch's 'Failed to initialize NumPy' through",
           "setup.py", 'warnings.filterwarnings("ignore", message="Failed to initialize NumPy",',
           'warnings.filterwarnings("default", message="Failed to initialize NumPy",', first=README_T),
    Mutant("setup-torch-imported-directly", "setup.py imports torch around the NumPy-warning filter",
           "setup.py", "def _torch_build_vars():\n    torch, ce = _import_torch()",
           "def _torch_build_vars():\n    import torch\n    import torch.utils.cpp_extension as ce",
           first=README_T),
    Mutant("setup-editable-filter-any-category", "setup.py silences every 'Editable installation' "
           "warning, not only setuptools' notice", "setup.py",
           'warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)',
           'warnings.filterwarnings("ignore", message="Editable installation")', first=README_T),
    Mutant("setup-editable-filter-all-notices", "setup.py silences every setuptools notice", "setup.py",
           'warnings.filterwarnings("ignore", message="Editable installation", category=InformationOnly)',
           'warnings.filterwarnings("ignore", category=InformationOnly)', first=README_T),
]

LAYOUT_T, IMPORTS_T = ("tests/test_layout.py",), ("tests/test_imports.py",)

# Issue #23 (2026-12-07): one solver loop, the fused round's layout defined once, imports
# one way down. Each planted by hand first and seen caught (tests/README.md).
PLAN_T = ("tests/test_planner.py",)
ISSUE_24 = [
    Mutant("serial-from-front", "the planner's serial switch continues from the front's frozen "
           "state, not the shadow's exact one", "deqir_fast/solvers/loop.py",
           "            q = self.stats.iterations              # the shadow holds the state after q - 1",
           "            q = self.lo", first=PLAN_T),
    Mutant("probe-not-counted", "the planner's probe calls are missing from nfe",
           "deqir_fast/solvers/loop.py",
           "            self.stats.nfe += self.planner.stats.probe_calls     # model calls on B images",
           "            pass", first=PLAN_T),
    Mutant("plan-no-shadow-row", "the planner prices a window without the shadow's row",
           "deqir_fast/solvers/planner.py",
           "            rows = (lambda W: W + 1) if shadow else (lambda W: W)   # noqa: E731",
           "            rows = (lambda W: W)   # noqa: E731",
           first=PLAN_T),
    Mutant("plan-no-growth-limit", "the planner guesses any window past the measured curve",
           "deqir_fast/solvers/planner.py", "            if n > limit and W > 2:",
           "            if False:", first=PLAN_T),
    Mutant("plan-ignores-shadow-lag", "the serial switch ignores the steps between the shadow "
           "and the front", "deqir_fast/solvers/planner.py",
           "        if self.allow_serial and (self.S - serial_at) * t_step <= remaining / best_rate:",
           "        if self.allow_serial and remaining * t_step <= remaining / best_rate:",
           first=PLAN_T),
    Mutant("plan-first-round-sampled", "a solve's first round (one-off costs) enters the "
           "cost curve", "deqir_fast/solvers/planner.py",
           "        if self.stats.windows or window == 1:", "        if True:", first=PLAN_T),
    Mutant("plan-slope-last-pair", "the curve is extrapolated with its last two samples' slope",
           "deqir_fast/solvers/planner.py",
           "        pts = [(n, self.samples[n]) for n in ns if 2 * n >= ns[-1]]",
           "        pts = [(n, self.samples[n]) for n in ns[-2:]]", first=PLAN_T),
    Mutant("plan-end-as-elsewhere", "a window at the chain's end is priced like any other "
           "(its episodes ignored)", "deqir_fast/solvers/planner.py",
           "            a = ep if self.episodes else max(a, ep)", "            a = a", first=PLAN_T),
    Mutant("plan-serial-old-front", "without a shadow the serial sampler restarts at the front "
           "before the round's freezes", "deqir_fast/solvers/loop.py",
           "            q = front\n", "            q = self.lo\n", first=PLAN_T),
    Mutant("plan-sharded-own-clock", "each rank prices rounds with its own time",
           "deqir_fast/distributed.py", "        return self.round_seconds\n",
           "        return None\n", first=("tests/test_distributed.py",)),
    Mutant("plan-rule-not-regrown", "a window grown past the Anderson ring keeps the old ring",
           "deqir_fast/solvers/loop.py", "        if new_hi - new_lo > self.rule_rows:",
           "        if False:", first=PLAN_T),
]

ISSUE_23 = [
    Mutant("rule-option-swallowed", "an option the update rule does not take is ignored",
           "deqir_fast/solvers/rules.py", "    if unused:\n        raise ValueError",
           "    if False:\n        raise ValueError", first=SOLVERS_T),
    Mutant("expert-keyword-dropped", "solve drops an expert option given as a keyword",
           "deqir_fast/api.py", "    if unknown:\n        expert =", "    if False:\n        expert =",
           first=("tests/test_check_every.py",)),
    Mutant("migrate-no-rule-history", "a step moving to another rank leaves the rule's history "
           "behind", "deqir_fast/distributed.py",
           "        fields = [X[s0:s1], *lin_fields, *(rule.export_steps(s0, s1) if full else [])]",
           "        fields = [X[s0:s1], *lin_fields]", first=DIST_T),
    Mutant("empty-call-no-G", "a rank without steps calls a G-reading rule with G = None",
           "deqir_fast/distributed.py",
           "        loop.call_rule(empty, empty, empty if loop.update.uses_residual else None, ctx)",
           "        loop.call_rule(empty, empty, None, ctx)", first=DIST_T),
    Mutant("rounds-mark-after-final", "the last round's accounting is never closed (or takes "
           "the final gather)", "deqir_fast/distributed.py",
           "        self._round_mark()          # the rounds' accounting leaves out the final gather\n",
           "", first=DIST_T),
    Mutant("prefix-not-summed", "the sharded triangular Anderson ignores the blocks before it",
           "deqir_fast/distributed.py", "            off = off + allb[k]", "            off = off",
           first=DIST_T),
    # -- the fused round's layout, defined once (ops/layout.py) ---------------------------------
    Mutant("layout-header-swap", "generated C++ layout header hand-edited: C_SN and C_SN2 swapped",
           "kernels/fused_round_layout.h", "constexpr int C_SN = 11;\nconstexpr int C_SN2 = 12;",
           "constexpr int C_SN = 12;\nconstexpr int C_SN2 = 11;", first=LAYOUT_T),
    Mutant("layout-py-swap", "layout.py: C_SN and C_SN2 swapped, header not regenerated",
           "deqir_fast/ops/layout.py", "C_PA, C_QA, C_R, C_SN, C_SN2, C_SYEB, C_SY = 8, 9, 10, 11, 12, 13, 14",
           "C_PA, C_QA, C_R, C_SN, C_SN2, C_SYEB, C_SY = 8, 9, 10, 12, 11, 13, 14", first=LAYOUT_T),
    Mutant("layout-ddnm-collision", "layout.py: DDNM's r*sigma_y column on sigma'^2's",
           "deqir_fast/ops/layout.py", "C_KEEP, C_ETA, C_RSY = 3, 4, 13", "C_KEEP, C_ETA, C_RSY = 3, 4, 12",
           first=LAYOUT_T),
    Mutant("triton-layout-name", "Triton kernel: constexpr C_SN takes layout's C_SN2",
           "deqir_fast/ops/triton_round.py", "C_SN = tl.constexpr(L.C_SN)\n",
           "C_SN = tl.constexpr(L.C_SN2)\n", first=LAYOUT_T),
    Mutant("triton-layout-literal", "Triton kernel reads DDRM's sigma_y at a hand-written column",
           "deqir_fast/ops/triton_round.py", "sy = tl.load(row + C_SY).to(dt)",
           "sy = tl.load(row + 13).to(dt)", first=LAYOUT_T),
    Mutant("native-stale-layout", "native.py loads a library compiled with another layout",
           "deqir_fast/ops/native.py", "wrong = _layout_mismatches(path)", "wrong = []", first=LAYOUT_T),
    # -- imports one way down the layers ---------------------------------------------------------
    Mutant("chains-imports-diffusers-compat", "DDIM.from_diffusers imports diffusers_compat again",
           "deqir_fast/chains.py",
           '        raise AttributeError("DDIM.from_diffusers moved: use dq.chain_from_diffusers(scheduler, "',
           '        from .diffusers_compat import chain_from_diffusers\n        return chain_from_diffusers(*args, **kwargs)\n        raise AttributeError("DDIM.from_diffusers moved: use dq.chain_from_diffusers(scheduler, "',
           first=IMPORTS_T),
    Mutant("schedules-imports-diffusers-compat", "Schedule.from_diffusers imports diffusers_compat again",
           "deqir_fast/schedules.py",
           '        raise AttributeError("Schedule.from_diffusers moved: use dq.schedule_from_diffusers("',
           '        from .diffusers_compat import schedule_from_diffusers\n        return schedule_from_diffusers(*args, **kwargs)\n        raise AttributeError("Schedule.from_diffusers moved: use dq.schedule_from_diffusers("',
           first=IMPORTS_T),
    Mutant("diffusers-compat-imports-models", "diffusers_compat re-exports eps_model from models",
           "deqir_fast/diffusers_compat.py",
           '    if name == "eps_model":                  # moved (issue #23): models imports this module\n',
           '    if name == "eps_model":                  # moved (issue #23): models imports this module\n        from .models import eps_model\n        return eps_model\n',
           first=IMPORTS_T),
    Mutant("backends-imports-scan", "backends imports scan_backend from ops/scan again",
           "deqir_fast/ops/backends.py",
           '    from . import native\n    try:\n        setting = forced()',
           '    from . import native\n    from .scan import scan_backend\n    try:\n        setting = forced()',
           first=IMPORTS_T),
    Mutant("solvers-import-distributed", "the solver loop imports the sharded engine (upward)",
           "deqir_fast/solvers/engines.py", "def default_engine(options):\n",
           "def default_engine(options):\n    from ..distributed import ShardedEngine  # noqa: F401\n",
           first=IMPORTS_T),
]

# Issue #25 (2026-12-08): Euler, Euler-ancestral and DPM-Solver++(2M) as chains; the
# order-2 chain's previous pair through the scan, the shadow, the serial sampler and the
# solver loop; the diffusers and k-diffusion adapters.
SAMPLERS_T = ("tests/test_samplers.py",)
ISSUE_25 = [
    Mutant("o2-enter-stale-two-back", "sharded: the last owner starts entering steps from its "
           "stale copy of the state two back (not sent by its holder)", "deqir_fast/distributed.py",
           "        if self.order == 2 and from_last_output and loop.hi >= 2:",
           "        if False:", first=DIST_T),
    # -- the order-2 chain through the solver (system, scan, shadow, loop) ------------------------
    Mutant("o2-prev-row-wrong-step", "a window's extra row (the state entering step lo - 1) is "
           "evaluated at step lo", "deqir_fast/system.py",
           "steps=torch.cat([steps, self._step_ids[lo - 1:lo]]))",
           "steps=torch.cat([steps, self._step_ids[lo:lo + 1]]))", first=SAMPLERS_T),
    Mutant("o2-scan-prev-stuck", "the scan never advances its previous pair (u_{i-1}, e_{i-1})",
           "deqir_fast/ops/scan.py", "            u_prev, e_prev = u, e\n", "", first=SAMPLERS_T),
    Mutant("o2-scan-prev-unlinearised", "the scan's previous model term is the lagged E, not "
           "the linearised e", "deqir_fast/ops/scan.py", "            u_prev, e_prev = u, e\n",
           "            u_prev, e_prev = u, E[i]\n", first=SAMPLERS_T),
    Mutant("o2-shadow-prev-after-step", "the shadow keeps its new state as the previous one",
           "deqir_fast/solvers/policy.py",
           "            self.u_prev.copy_(self.u)\n            self.e_prev.copy_(e)\n            self.u.copy_(u)\n",
           "            self.u.copy_(u)\n            self.u_prev.copy_(self.u)\n            self.e_prev.copy_(e)\n",
           first=SAMPLERS_T),
    Mutant("o2-restart-no-prev", "a restart / serial switch writes only X[p], not the shadow's "
           "previous state into X[p - 1]", "deqir_fast/solvers/engines.py",
           "            loop.X[p - 1] = loop.shadow.u_prev\n", "            pass\n", first=SAMPLERS_T),
    Mutant("o2-shadow-overwrites-prev", "the shadow overwrites the state lo - 2 an order-2 "
           "window still reads", "deqir_fast/solvers/loop.py",
           'if p < lo - getattr(self.system, "order", 1):', "if p < lo - 1:", first=SAMPLERS_T),
    Mutant("o2-serial-prev-after-step", "the serial sampler passes its new state as the previous one",
           "deqir_fast/system.py", "                previous = (u, e)\n",
           "                previous = (u_next, e)\n", first=SAMPLERS_T),
    # check_every > 1 (the read-back engine, since eeca431): the bad state in a batch's last
    # round, where the restart's window reads the state before it
    Mutant("o2-readback-restart-no-prev", "check_every: a restart leaves the state before the "
           "bad one as frozen", "deqir_fast/solvers/engines.py",
           "            loop.X[p - 1] = self.shadow_hist[q - 1] if q > 0 else self.shadow_before\n",
           "            pass\n", first=SAMPLERS_T),
    Mutant("o2-readback-prev-batch-start", "check_every: the state before the bad one taken from "
           "before the batch even when the batch holds it", "deqir_fast/solvers/engines.py",
           "self.shadow_hist[q - 1] if q > 0 else self.shadow_before",
           "self.shadow_before", first=SAMPLERS_T),
    # -- DPM-Solver++(2M)'s coefficients (chains.py) ----------------------------------------------
    Mutant("dpm-midpoint-kappa-x2", "midpoint's κ without the 1/2", "deqir_fast/chains.py",
           "            kappa = K / (2 * r)", "            kappa = K / r", first=SAMPLERS_T),
    Mutant("dpm-heun-kappa-half", "heun's κ halved like midpoint's", "deqir_fast/chains.py",
           "            kappa = an.sqrt() * (torch.expm1(-h) / h + 1) / r",
           "            kappa = an.sqrt() * (torch.expm1(-h) / h + 1) / (2 * r)", first=SAMPLERS_T),
    Mutant("dpm-prev-eps-sign", "the previous step's eps enters m_{i-1} with the wrong sign",
           "deqir_fast/chains.py", "        D = kappa * (1 - a_prev).sqrt() / a_prev.sqrt()",
           "        D = -kappa * (1 - a_prev).sqrt() / a_prev.sqrt()", first=SAMPLERS_T),
    Mutant("dpm-step0-second-order", "step 0 not forced first-order (κ_0 from a made-up h_{-1})",
           "deqir_fast/chains.py", "        first_order[0] = True\n", "", first=SAMPLERS_T),
    Mutant("dpm-to-zero-second-order", "a step to σ = 0 not forced first-order",
           "deqir_fast/chains.py", "        first_order |= self.alpha_next >= 1.0",
           "        first_order |= self.alpha_next > 1.0", first=SAMPLERS_T),
    # -- Euler-ancestral (chains.py) ---------------------------------------------------------------
    Mutant("ancestral-up-uncapped", "σ_up without get_ancestral_step's min(σ', .) cap (eta > 1)",
           "deqir_fast/chains.py", "        up = torch.minimum(sigma_next, self.eta * ",
           "        up = (0 * sigma_next + self.eta * ", first=SAMPLERS_T),
    Mutant("ancestral-no-s-noise", "s_noise dropped from the ancestral noise",
           "deqir_fast/chains.py", "(r * up * self.s_noise if self.needs_noise else None)",
           "(r * up if self.needs_noise else None)", first=SAMPLERS_T),
    # -- the diffusers adapter (diffusers_compat.py, models.py) -----------------------------------
    Mutant("euler-initial-scale-ignored", "diffusers Euler: init_noise_sigma / sqrt(1 + σ_0²) ignored",
           "deqir_fast/diffusers_compat.py",
           "        chain.initial_scale = init_sigma / (1.0 + float(sigmas[0]) ** 2) ** 0.5",
           "        chain.initial_scale = 1.0", first=SAMPLERS_T),
    Mutant("euler-output-scale-ignored", "diffusers Euler: a final σ > 0 not scaled back to x",
           "deqir_fast/diffusers_compat.py", "        chain.output_scale = 1.0 / final_alpha ** 0.5",
           "        chain.output_scale = 1.0", first=SAMPLERS_T),
    Mutant("dpm-lower-order-final-inverted", "lower_order_final applied from 15 steps up, not below",
           "deqir_fast/diffusers_compat.py", 'cfg.get("lower_order_final", True) and S_loop < 15)',
           'cfg.get("lower_order_final", True) and S_loop >= 15)', first=SAMPLERS_T),
    Mutant("dpm-final-flag-dropped", "the loop's last step never first order from the config",
           "deqir_fast/diffusers_compat.py", "            first[-1] = bool(last_low)",
           "            first[-1] = False", first=SAMPLERS_T),
    Mutant("eps-model-steps-unmapped", "the network called with step indices, not the "
           "scheduler's model_timesteps", "deqir_fast/models.py",
           "        t_net = t if self.model_timesteps is None else \\",
           "        t_net = t if True else \\", first=SAMPLERS_T),
    # -- the k-diffusion adapter (k_diffusion.py) -------------------------------------------------
    Mutant("kd-noise-at-last-step", "noise_sampler also called for the step to σ = 0",
           "deqir_fast/k_diffusion.py",
           "        return [None if not float(s[i + 1]) > 0 else sampler(s[i], s[i + 1])",
           "        return [sampler(s[i], s[i + 1])", first=SAMPLERS_T),
    Mutant("kd-noise-args-swapped", "noise_sampler called as (sigma_next, sigma)",
           "deqir_fast/k_diffusion.py", "else sampler(s[i], s[i + 1])",
           "else sampler(s[i + 1], s[i])", first=SAMPLERS_T),
]

MUTANTS = [
    # -- solvers.py: the update rules, the freeze and stop rules ----------------------------
    Mutant("tri-as-plain", "triangular Anderson run as per-step Anderson (prefix flag ignored)",
           "deqir_fast/solvers/rules.py", '    prefix = True\n',
           '    prefix = False\n'),
    Mutant("freeze-ratio", "freeze rule at 10x: FREEZE_RATIO 0.1 instead of 0.01",
           "deqir_fast/solvers/options.py", 'FREEZE_RATIO = 0.01',
           'FREEZE_RATIO = 0.1'),
    Mutant("freeze-at-tol", "freeze threshold tol instead of tol * freeze_ratio",
           "deqir_fast/solvers/policy.py", '    thr = tol * freeze_ratio\n',
           '    thr = tol\n'),
    Mutant("freeze-off-by-one", "freeze test looks at the step itself, not the one before",
           "deqir_fast/solvers/policy.py", 'lead = torch.cumprod(met[:-1].to(torch.int64), 0)',
           'lead = torch.cumprod(met[1:].to(torch.int64), 0)'),
    Mutant("stop-10tol", "stopping rule: converged when max r <= 10 tol",
           "deqir_fast/solvers/policy.py", '    return thr, (tol if last else thr)',
           '    return thr, (10 * tol if last else thr)'),
    Mutant("guard-off", "linearisation guard never fires (GUARD_GROWTH huge)",
           "deqir_fast/solvers/policy.py", 'GUARD_GROWTH = 10.0',
           'GUARD_GROWTH = 1e30'),
    Mutant("anderson-drop", "the rule's context holds window-relative steps, not absolute ones "
           "(Anderson's history rows collide as the window slides)",
           "deqir_fast/solvers/engines.py",
           "        return RoundContext(lo, hi, lo, hi, rows=max(1, hi - lo), like=loop.X[0])",
           "        return RoundContext(lo, hi, 0, hi - lo, rows=max(1, hi - lo), like=loop.X[0])"),
    Mutant("window-enter-zero", "steps entering the window start from zero, not the last state",
           "deqir_fast/solvers/policy.py",
           "X[hi:new_hi] = X[hi - 1] if start is None else torch.where(torch.isfinite(start), start, X[hi - 1])",
           "X[hi:new_hi] = 0"),
    # -- solvers.py: the check_every path (device-side freeze counter) ---------------------
    Mutant("ce-counter+1", "check_every: the device freeze counter one step ahead (2 + lead)",
           "deqir_fast/solvers/policy.py", "torch.maximum(1 + lead, frozen + 1)", "torch.maximum(2 + lead, frozen + 1)"),
    Mutant("ce-counter-1", "check_every: the device freeze counter one step behind (lead)",
           "deqir_fast/solvers/policy.py", "torch.maximum(1 + lead, frozen + 1)", "torch.maximum(lead, frozen)"),
    Mutant("ce-frozen-mask", "check_every: the first unfrozen step counted as met (pos <= frozen)",
           "deqir_fast/solvers/policy.py", "met = (r <= thr) | (pos < frozen)", "met = (r <= thr) | (pos <= frozen)"),
    Mutant("ce-slide+1", "check_every: the window slides by f + 1",
           "deqir_fast/solvers/loop.py", '        new_lo = self.lo + n_done\n',
           '        new_lo = min(self.lo + n_done + 1, self.S - 1)\n'),
    # -- ops/anderson.py: the ring buffer ---------------------------------------------------
    Mutant("ring-slot", "AndersonRing.push overwrites the newest slot, not the oldest",
           "deqir_fast/ops/anderson.py", "        p = self.count % self.m\n", "        p = (self.count - 1) % self.m\n"),
    Mutant("ring-held-order", "AndersonRing.held lists the slots newest first",
           "deqir_fast/ops/anderson.py", "for i in range(h)]", "for i in reversed(range(h))]"),
    Mutant("ring-step-of", "AndersonRing records window-relative steps, not absolute ones",
           "deqir_fast/ops/anderson.py", "% self.rows] = torch.arange(lo, hi)", "% self.rows] = torch.arange(hi - lo)"),
    # -- linearize.py ------------------------------------------------------------------------
    Mutant("secant-no-cap", "secant slope: upper clamp 1/sqrt(1-a) removed",
           "deqir_fast/linearize.py",
           "        slope = torch.minimum((num / torch.where(moved, den, torch.ones_like(den))).clamp_min(0),\n"
           "                              self.cap[lo:hi])",
           "        slope = (num / torch.where(moved, den, torch.ones_like(den))).clamp_min(0)"),
    Mutant("secant-no-clamp", "secant slope: both clamps removed",
           "deqir_fast/linearize.py",
           "        slope = torch.minimum((num / torch.where(moved, den, torch.ones_like(den))).clamp_min(0),\n"
           "                              self.cap[lo:hi])",
           "        slope = num / torch.where(moved, den, torch.ones_like(den))"),
    # -- chains.py / ops/fused_round.py: the DDRM cases ------------------------------------
    Mutant("ddrm-etab-chain", "DDRM eta_b dropped from the case-3 noise term (chains.DDRM._k)",
           "deqir_fast/chains.py", "(sy * eta_b * inv_s) ** 2", "(sy * inv_s) ** 2"),
    Mutant("ddrm-etab-table", "DDRM eta_b dropped from the case-3 noise term (step_table)",
           "deqir_fast/ops/fused_round.py", "T[:, C_SYEB] = sy * eta_b", "T[:, C_SYEB] = sy"),
    Mutant("ddrm-split-chain", "DDRM case split on sigma' instead of s*sigma' (chains.DDRM._cases)",
           "deqir_fast/chains.py", "(s > 0) & (s * sigma_next ", "(s > 0) & (sigma_next ", count=2),
    Mutant("ddrm-split-ref", "DDRM case split on sigma' instead of s*sigma' (fused-round reference)",
           "deqir_fast/ops/fused_round.py", "pos & (s * sn ", "pos & (sn ", count=2),
    # -- ops/fused_round.py, backends.py, scan.py (own choices) -----------------------------
    Mutant("ref-class-slope", "fused-round reference: J of class 0 for every element",
           "deqir_fast/ops/fused_round.py", "j = sl[:, cls[0].long()]", "j = sl[:, :1].reshape(-1, *pad)"),
    Mutant("ddnm-part-lambda", "DDNM+ partial range: kY without lambda",
           "deqir_fast/ops/fused_round.py", "torch.where(part, (col(C_R) * lam) * inv_s,", "torch.where(part, col(C_R) * inv_s,"),
    Mutant("ybar-batch", "fused round launcher: per-item ybar flattened to batch 1",
           "deqir_fast/ops/fused_round.py", "flat(ybar, ybar.shape[0], n)", "flat(ybar[:1], 1, n)"),
    Mutant("no-validation", "backends: first-use validation against the reference skipped",
           "deqir_fast/ops/backends.py",
           "    return (backend, device.type, sampler, dtype) not in _validated\n", "    return False\n"),
    Mutant("no-demotion", "backends: a kernel failing validation is not demoted",
           "deqir_fast/ops/backends.py",
           "        _demoted[(backend, device.type)] = f\"failed validation", "        None and f\"failed validation"),
    Mutant("scan-r-stride", "generic reference scan: R read at step 0 for every step",
           "deqir_fast/ops/scan.py", "None if R is None else R[i], u)", "None if R is None else R[0], u)"),
    # -- Triton kernels (run under TRITON_INTERPRET=1 in a subprocess by the tests) -----------
    Mutant("triton-scan-r-stride", "Triton scan reads R at the per-item batch stride (wrong when R is broadcast)",
           "deqir_fast/ops/triton_scan.py", "R + i * r_s + b * r_b + k * r_n", "R + i * r_s + b * n_per_item + k * r_n",
           count=2),                   # the order-1 and the order-2 load
    Mutant("triton-scan-j-stride", "Triton scan reads J at P's strides",
           "deqir_fast/ops/triton_scan.py", "J + i * j_s + b * j_b + k * j_n", "J + i * p_s + b * p_b + k * p_n"),
    Mutant("triton-round-ybar-stride", "Triton fused round reads ybar at the per-item stride (wrong when broadcast)",
           "deqir_fast/ops/triton_round.py", "YB + b * yb_b + k", "YB + b * n + k"),
    Mutant("triton-round-noise-next", "Triton fused round reads the noise of step i+1",
           "deqir_fast/ops/triton_round.py", "kZ * tl.load(Z + at, mask=mask, other=0.0))",
           "kZ * tl.load(Z + at + N, mask=mask & (i + 1 < W), other=0.0))"),
    # -- diffusers_compat.py -------------------------------------------------------------------
    Mutant("diffusers-trailing", "diffusers 'trailing' timesteps without the -1",
           "deqir_fast/diffusers_compat.py", "        ts -= 1\n", "        ts -= 0\n"),
    # -- kernels/ (C++; rebuilt with CMake in the copy) ---------------------------------------
    Mutant("cpp-noise-next", "C++ fused round reads the noise draw of step i+1",
           "kernels/fused_round_cpu.cpp", "const T* z = HAS_Z ? Z + i * N + base : nullptr;",
           "const T* z = HAS_Z ? Z + (i + 1 < W ? i + 1 : i) * N + base : nullptr;"),
    Mutant("cpp-ddrm-as-ddnm", "C++ fused round: sampler flag DDRM dispatched as DDNM",
           "kernels/fused_round_cpu.cpp", "case kDDRM: f(std::integral_constant<int, kDDRM>{})",
           "case kDDRM: f(std::integral_constant<int, kDDNM>{})"),
    Mutant("cpp-ddrm-split", "C++ DDRM case split on sigma' instead of s*sigma' (fused_round.h)",
           "kernels/fused_round.h", "const T ss = s * st.c[C_SN];", "const T ss = st.c[C_SN];"),
    Mutant("cpp-ybar-batch", "C++ fused round reads ybar at batch stride 0 always",
           "kernels/fused_round_cpu.cpp", "const int64_t yb_b = hy && ybar->size(0) > 1 ? n : 0;",
           "const int64_t yb_b = 0;"),
    # -- the residual weighting of DDNM's derived range elements (system.py) -----------------
    Mutant("ddnm-weight-null", "DDNM's weight applied to the null space instead of the range",
           "deqir_fast/system.py", "derived = self.chain.jacobian_classes(lo + c, lo + e, A) == 1",
           "derived = self.chain.jacobian_classes(lo + c, lo + e, A) == 0"),
    Mutant("ddnm-weight-no-cap", "the Lipschitz bound L dropped from the weight",
           "deqir_fast/system.py", "q_other[1:] * cap[1:] * scale[1:]", "q_other[1:] * scale[1:]"),
    Mutant("ddnm-fused-unweighted", "the fused round's residual returned unweighted",
           "deqir_fast/system.py", "            if w is None:\n                return FX, r\n",
           "            return FX, r\n"),
    Mutant("sharded-unweighted", "the sharded solve's carry-corrected residual unweighted",
           "deqir_fast/distributed.py", "                if self.fused:       # the chain's own measure",
           "                if False:       # the chain's own measure"),
    # -- initial guesses (api.py, system.py) --------------------------------------------------
    Mutant("pinv-ignores-sigma-y", "pinv start takes ȳ/s on every s > 0 (noise amplified)",
           "deqir_fast/system.py", 'seen = s > getattr(chain, "sigma_y", 0.0)', "seen = s > 0"),
    Mutant("auto-init-jump", "init='auto' resolves to 'jump' for restoration chains",
           "deqir_fast/api.py", 'init = "pinv" if system.chain.operator is not None else "jump"',
           'init = "jump"'),
    # -- Anderson history in 16 bits (ops/anderson.DifferenceRing) ----------------------------
    Mutant("diffring-view", "the mix updates a view of the ring (history overwritten)",
           "deqir_fast/ops/anderson.py", ".to(g.dtype, copy=True)", ".to(g.dtype)"),
    Mutant("diffring-span", "a difference pair used on steps only one of its rounds saw",
           "deqir_fast/ops/anderson.py", "a, b = max(lo, plo), min(hi, phi)", "a, b = plo, phi"),
    Mutant("diffring-history-ignored", "the 16-bit history thrown away (γ = 0: damped Picard)",
           "deqir_fast/ops/anderson.py", "        return torch.where(ok, gamma, torch.zeros_like(gamma))",
           "        return torch.zeros_like(gamma)"),
    Mutant("diffring-no-prefix", "triangular weights of the difference ring not prefix-summed",
           "deqir_fast/ops/anderson.py", "H, rhs = H.cumsum(0), rhs.cumsum(0)", "H, rhs = H, rhs"),
    Mutant("diffring-stale-leak", "a difference pair applied outside its span (0 · stale row)",
           "deqir_fast/ops/anderson.py", "a, b = max(lo, self.span[j][0]), min(hi, self.span[j][1])",
           "a, b = lo, hi"),
    # -- sliding windows (docs/design.md §3c) -------------------------------------------------
    Mutant("window-accept-at-tol", "a window with steps after it accepted whole at tol",
           "deqir_fast/solvers/loop.py", 'last=hi == self.S)',
           'last=True)'),
    Mutant("extend-wrong-steps", "entering steps extended with the previous steps' coefficients",
           "deqir_fast/system.py", "return self.scan(E, U, hi, new_hi, previous=previous)",
           "return self.scan(E, U, hi - 1, new_hi - 1, previous=previous)"),
    Mutant("extend-wrong-carry", "entering steps extended from X[hi-2]",
           "deqir_fast/system.py", "U = X[hi - 1:hi].expand", "U = X[hi - 2:hi - 1].expand"),
    # -- the serial shadow (docs/design.md §3d) -------------------------------------------
    Mutant("shadow-no-restart", "a frozen state off the serial one is ignored (no restart)",
           "deqir_fast/solvers/loop.py", '            if not deviation <= self.tol:\n',
           '            if False:\n'),
    Mutant("shadow-unfrozen", "the shadow compared with a state that is not frozen yet",
           "deqir_fast/solvers/loop.py", '        compare = p < lo      #',
           '        compare = p <= lo      #'),
    Mutant("shadow-no-restart-device", "check_every: a frozen state off the serial one is ignored",
           "deqir_fast/solvers/loop.py", '        if not over:\n            return False\n',
           '        if True:\n            return False\n'),
    Mutant("shadow-restart-one-state", "check_every: the restart takes only the bad step's serial state",
           "deqir_fast/solvers/engines.py", '        loop.X[p:p + self.shadow_hist.shape[0] - q] = self.shadow_hist[q:]',
           '        loop.X[p] = self.shadow_hist[q]'),
    Mutant("shadow-restart-behind", "check_every: restart after the bad step, behind the round count, "
           "with only its serial state",
           "deqir_fast/solvers/loop.py",
           "        self.engine.put_serial(self, p0 + q, q)\n        self.restart(p0 + n_rounds)\n",
           "        self.engine.take_serial(self, p0 + q, q)\n        self.restart(p0 + q + 1)\n"),
    Mutant("shadow-keeps-tol", "after the restart the freeze rule keeps tol (not exact states only)",
           "deqir_fast/solvers/loop.py",
           'S rounds still suffice)."""\n        self.shadow, self.tol, self.prev_row = None, 0.0, None',
           'S rounds still suffice)."""\n        self.shadow, self.prev_row = None, None'),   # restart's
    Mutant("shadow-wrong-step", "the shadow steps with the next step's coefficients",
           "deqir_fast/system.py", "self._table.index_select(0, p), e[None]",
           "self._table.index_select(0, p + 1), e[None]"),
    # -- DDNM's derived weight (docs/design.md §3b) -----------------------------------------
    Mutant("derived-one-step", "the derived weight's leak not summed over the span (one step)",
           "deqir_fast/system.py", "w = (c[k] - c[:-1]).clamp_max(1.0)", "w = w"),
    *ISSUE_22,
    *ISSUE_23,
    *ISSUE_24,
    *ISSUE_25,
]


# Run with --all only: variants of a core mutant or of code the core ones already cover.
EXTRA = {"window-enter-zero", "ce-counter-1", "ring-held-order",
         "secant-no-clamp", "ddnm-part-lambda", "ybar-batch", "no-demotion", "scan-r-stride",
         "triton-scan-j-stride", "triton-round-noise-next", "cpp-ddrm-split", "cpp-ybar-batch"}


def source_files(root: Path):
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=root,
                         capture_output=True, check=True).stdout.decode()
    return [p for p in out.split("\0") if p]


def make_copy(dest: Path, from_head: bool = False, overlay=()) -> None:
    """The working tree's files (or, with ``from_head``, the files of the HEAD commit plus
    the working-tree paths in ``overlay``: other people's unfinished edits stay out),
    and the built native library."""
    if from_head:
        archive = subprocess.run(["git", "archive", "HEAD"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        files = [p for p in overlay]
    else:
        files = source_files(ROOT)
    for rel in files:
        src = ROOT / rel
        if src.is_dir():
            for sub in src.rglob("*"):
                if sub.is_file() and "__pycache__" not in sub.parts:
                    dst = dest / sub.relative_to(ROOT)
                    dst.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copy2(sub, dst)
            continue
        if not src.is_file():               # deleted in the working tree
            continue
        dst = dest / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)
    for lib in list((ROOT / "deqir_fast").glob("_native_kernels*.so")) + \
            [ROOT / "deqir_fast" / "_native_build.json"]:
        if lib.exists():
            shutil.copy2(lib, dest / "deqir_fast" / lib.name)


def apply(m: Mutant, dest: Path) -> None:
    if not m.old:                       # the baseline: nothing planted
        return
    path = dest / m.file
    text = path.read_text()
    found = text.count(m.old)
    if found != m.count:
        raise SystemExit(f"mutant {m.id}: expected {m.count} occurrence(s) of {m.old!r} in "
                         f"{m.file}, found {found} (update the mutant to the current code)")
    path.write_text(text.replace(m.old, m.new))


def rebuild_native(dest: Path, log) -> None:
    build = dest / "build" / "mutant"
    cmd = f"cmake -S {dest} -B {build} -DPython_EXECUTABLE={sys.executable} && cmake --build {build} -j2"
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    log.write(proc.stdout + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"native build failed (see log): {proc.stderr[-500:]}")
    built = build / "deqir_fast_kernels.so"
    libs = list((dest / "deqir_fast").glob("_native_kernels*.so"))
    if not libs:
        raise RuntimeError("the working tree has no built native library to replace")
    for lib in libs:
        shutil.copy2(built, lib)


def env_for(dest: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(dest), OMP_NUM_THREADS="1")
    for var in ("DEQIR_FAST_BACKEND", "DEQIR_FAST_NATIVE_LIB", "TRITON_INTERPRET"):
        env.pop(var, None)
    return env


def check_import(dest: Path) -> None:
    out = subprocess.run([sys.executable, "-c", "import deqir_fast; print(deqir_fast.__file__)"],
                         cwd=dest, env=env_for(dest), capture_output=True, text=True)
    where = out.stdout.strip()
    if not where.startswith(str(dest)):
        raise RuntimeError(f"the copy imports deqir_fast from {where!r}, not from {dest}: "
                           f"{out.stderr[-300:]}")


# Test files run first, in this order, then the rest of tests/test_*.py (sorted): the files
# meant to catch solver bugs, so a caught mutant stops early. The whole suite still runs
# for a mutant nothing catches.
FIRST = ["tests/test_solvers.py", "tests/test_check_every.py", "tests/test_anderson.py",
         "tests/test_linearize.py", "tests/test_ddrm_cases.py", "tests/test_kernels.py",
         "tests/test_parity.py", "tests/test_triton_scan.py", "tests/test_triton_round.py"]


def run_suite(dest: Path, extra, timeout: int, lead=()):
    first = [f for f in (*lead, *FIRST) if (dest / f).exists()]
    first = list(dict.fromkeys(first))
    rest = sorted(str(p.relative_to(dest)) for p in (dest / "tests").glob("test_*.py"))
    files = first + [f for f in rest if f not in first]
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *extra, *files]
    t0 = time.time()
    try:
        proc = subprocess.run(cmd, cwd=dest, env=env_for(dest), capture_output=True, text=True,
                              timeout=timeout)
        out, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        rc = -9
    return rc, out, time.time() - t0


def first_failure(out: str) -> str:
    m = re.search(r"^(?:FAILED|ERROR) (\S+)", out, re.M)
    return m.group(1) if m else ""


def check_one(m: Mutant, args) -> dict:
    tmp = Path(tempfile.mkdtemp(prefix=f"mut-{m.id}-", dir=args.workdir))
    dest = tmp / "repo"
    dest.mkdir()
    rec = {"id": m.id, "what": m.what, "file": m.file}
    try:
        make_copy(dest, args.from_head, args.overlay)
        apply(m, dest)
        with open(tmp / "build.log", "w") as log:
            if m.file.startswith("kernels/"):
                rebuild_native(dest, log)
        check_import(dest)
        rc, out, secs = run_suite(dest, args.pytest_args, args.timeout, m.first)
        (tmp / "pytest.log").write_text(out)
        last = out.strip().splitlines()[-1] if out.strip() else ""
        rec.update(caught=rc != 0, first_failure=first_failure(out) or ("timeout" if rc == -9 else ""),
                   seconds=round(secs, 1), summary=last, log=str(tmp / "pytest.log"))
    except Exception as exc:            # noqa: BLE001 - report and go on
        rec.update(caught=None, first_failure="", seconds=0, summary=f"error: {exc}")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
            rec.pop("log", None)
    return rec


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="comma-separated mutant ids")
    p.add_argument("--all", action="store_true", help="also the extra mutants (EXTRA)")
    p.add_argument("--list", action="store_true", help="list the mutants and exit")
    p.add_argument("--jobs", type=int, default=1, help="mutants run at once (each pytest is 1 thread)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per suite run")
    p.add_argument("--keep", action="store_true", help="keep the copies and logs")
    p.add_argument("--baseline", action="store_true", help="run the unmutated copy first; stop if red")
    p.add_argument("--json", help="write the results here as JSON")
    p.add_argument("--from-head", action="store_true",
                   help="copy the HEAD commit instead of the working tree (plus --overlay paths)")
    p.add_argument("--overlay", default=[], type=lambda v: [x for x in v.split(",") if x],
                   metavar="PATHS", help="with --from-head: comma-separated working-tree files or "
                                         "folders copied over HEAD's")
    p.add_argument("--workdir", default=None, help="where the copies go (default: the system tmp)")
    p.add_argument("pytest_args", nargs="*", help="extra pytest arguments (after --)")
    args = p.parse_args(argv)
    mutants = [m for m in MUTANTS if args.all or not m.extra]
    if args.only:
        ids = args.only.split(",")
        unknown = set(ids) - {m.id for m in MUTANTS}
        if unknown:
            raise SystemExit(f"unknown mutant ids: {sorted(unknown)}")
        mutants = [m for m in MUTANTS if m.id in ids]
    if args.list:                       # also checks that every mutant still matches
        for m in mutants:
            found = (ROOT / m.file).read_text().count(m.old)
            ok = "" if found == m.count else f"  <-- {found} matches, expected {m.count}"
            print(f"{m.id:26s} {m.file:32s} {m.what}{ok}")
        return 0
    if args.baseline:
        base = Mutant("baseline", "no mutation", "deqir_fast/__init__.py", "", "", count=0)
        rec = check_one(base, args)
        print(f"baseline: {rec['summary']} ({rec['seconds']} s)", flush=True)
        if rec["caught"] is not False:
            raise SystemExit("the unmutated suite is not green: fix it before checking mutants")
    results = []
    with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {pool.submit(check_one, m, args): m for m in mutants}
        for fut in cf.as_completed(futures):
            rec = fut.result()
            results.append(rec)
            verdict = {True: "caught", False: "NOT CAUGHT", None: "ERROR"}[rec["caught"]]
            print(f"{rec['id']:26s} {verdict:10s} {rec['first_failure'] or '-'}  ({rec['seconds']} s) "
                  f"{rec['summary'] if rec['caught'] is not True else ''}", flush=True)
    order = {m.id: k for k, m in enumerate(MUTANTS)}
    results.sort(key=lambda r: order[r["id"]])
    print("\n| mutant | where | what | caught by |\n|---|---|---|---|")
    for r in results:
        by = r["first_failure"] if r["caught"] else ("**not caught**" if r["caught"] is False
                                                      else f"error: {r['summary']}")
        print(f"| {r['id']} | {r['file']} | {r['what']} | {by} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    missed = [r["id"] for r in results if r["caught"] is not True]
    if missed:
        print(f"\nnot caught (or error): {', '.join(missed)}")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
