"""The benchmark's plots (matplotlib, Agg, imported when drawing): wall time and rounds
against the number of steps S, and the residual per round per solver, each titled with
what it shows and captioned with how it was measured."""
from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Dict, List

from ..api import DEFAULT_TOL
from ..peers import PLANNED
from .config import OURS, SERIAL

_COLORS = {SERIAL: "black", OURS: "tab:blue", "ParaDiGMS": "tab:orange", "DeqIR": "tab:green",
           "ParaTAA": "tab:red"}
_MARKERS = {SERIAL: "o", OURS: "s", "ParaDiGMS": "^", "DeqIR": "v", "ParaTAA": "D"}


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _panels(plt, n: int):
    cols = 2 if n > 1 else 1
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 3.7 * rows + 1.9), squeeze=False)
    flat = list(axes.flat)
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _finish(fig, plt, path: Path, title: str, caption: str) -> None:
    """A takeaway title, one legend for every panel under it, a caption at the bottom."""
    handles, labels = {}, []
    for ax in fig.axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in handles:
                handles[lab] = h
                labels.append(lab)
    width, height = fig.get_figwidth(), fig.get_figheight()
    title_lines = [w for line in title.split("\n") for w in textwrap.wrap(line, int(width * 9.5))]
    lines = textwrap.wrap(caption, int(width * 12.5))
    ncol = min(len(labels), 3) or 1
    top = 0.2 + 0.22 * len(title_lines) + (0.1 + 0.19 * math.ceil(len(labels) / ncol)
                                             if labels else 0)        # inches
    bottom = 0.15 + 0.15 * len(lines)
    # Lay the panels out first: tight_layout would otherwise make room for the title twice.
    fig.tight_layout(rect=(0, bottom / height, 1, 1 - top / height))
    fig.suptitle("\n".join(title_lines), fontsize=11.5, y=1 - 0.08 / height, va="top")
    if labels:
        fig.legend([handles[lab] for lab in labels], labels, loc="upper center", fontsize=8.5,
                   ncol=ncol, frameon=False,
                   bbox_to_anchor=(0.5, 1 - (0.14 + 0.22 * len(title_lines)) / height))
    fig.text(0.5, 0.008, "\n".join(lines), ha="center", va="bottom", fontsize=8, color="0.25")
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def _steps_axis(ax, steps, log_y: bool = True) -> None:
    """Log axes labelled in plain numbers: x ticks at the measured S."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter, NullLocator
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(FixedLocator(sorted(steps)))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(plain)
    if log_y:
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(plain)
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.grid(True, which="major", alpha=0.3)


def _by_chain(runs: List[dict], batch: int):
    out: Dict[str, List[dict]] = {}
    for r in runs:
        if r["batch"] == batch:
            out.setdefault(r["chain"], []).append(r)
    return out


def _series(rows: List[dict], method: str, key: str):
    pts = sorted((r["steps"], r[key], i) for i, r in enumerate(rows)
                 if r["method"] == method and r[key] is not None)
    return [p[0] for p in pts], [p[1] for p in pts], [rows[p[2]] for p in pts]


def _methods(report: dict) -> List[str]:
    return [SERIAL] + list(report["meta"]["config"]["peers"])


def time_takeaway(report: dict, batch: int) -> str:
    runs = [r for r in report["runs"] if r["batch"] == batch and r["wall_s"] is not None]
    par = [r for r in runs if r["method"] != SERIAL]
    ratios = [r["ratio"] for r in report["loops"] if r["ratio"]]
    loops = ""
    if ratios:
        span = f"{min(ratios):.2f}" if len(ratios) == 1 else f"{min(ratios):.2f}-{max(ratios):.2f}"
        verdict = "no slower than" if max(ratios) <= 1 else "not always faster than"
        loops = (f"our serial sampler is {verdict} diffusers' DDIMScheduler loop "
                 f"(time ratio {span} over every S and B)")
    if not par:
        return ("Measured: " + loops) if loops else "Wall time per solve against the number of steps S"
    meta = report["meta"]
    where = "on this CPU" if meta["device"] == "cpu" else f"on {meta['device_name']}"
    wins = [r for r in par if r["speedup_vs_serial"] and r["speedup_vs_serial"] > 1]
    ours = [r for r in par if r["method"] == OURS and r["speedup_vs_serial"]]
    if not wins:
        slow = [1 / r["speedup_vs_serial"] for r in ours]
        head = f"Measured {where}, serial is faster than every parallel solve at every S"
        if slow:
            head += f" (deqir_fast {min(slow):.1f}-{max(slow):.1f}x slower)"
    elif len(wins) == len(par):
        head = f"Measured {where}, every parallel solve is faster than serial at every S"
    else:
        best = max(wins, key=lambda r: r["speedup_vs_serial"])
        head = (f"Measured {where}, parallel is faster than serial in {len(wins)} of {len(par)} "
                f"runs (best {best['speedup_vs_serial']:.1f}x: {best['method']}, {best['chain']}, "
                f"S={best['steps']})")
    fraction = meta.get("batch_cost_fraction")
    tail = []
    if fraction is not None:
        tail.append(f"a round's batched call costs {fraction:.0%} of its calls made one by one")
    ideal = [r["steps"] / r["sequential_calls"] for r in ours if r["sequential_calls"]]
    if ideal and not meta["speed_only"]:
        tail.append(f"if a batch cost one call (dotted, an assumption) deqir_fast would be "
                    f"{min(ideal):.1f}-{max(ideal):.1f}x faster than serial")
    if loops:
        tail.append(loops)
    return head + ("\n" + "; ".join(tail) if tail else "")


def plot_time(report: dict, path: Path) -> None:
    plt = _pyplot()
    batch = min(r["batch"] for r in report["runs"])
    chains = _by_chain(report["runs"], batch)
    fig, axes = _panels(plt, len(chains))
    for ax, (chain, rows) in zip(axes, chains.items()):
        for m in _methods(report):
            xs, ys, _ = _series(rows, m, "wall_s")
            if xs:
                label = "serial sampler, measured" if m == SERIAL else f"{m}, measured"
                ax.plot(xs, ys, color=_COLORS.get(m), marker=_MARKERS.get(m, "o"),
                        linewidth=2.4 if m in (SERIAL, OURS) else 1.1, label=label)
        loop = sorted((r["steps"], r["diffusers_s"]) for r in report["loops"]
                      if r["batch"] == batch and r["diffusers_s"] is not None)
        if chain == "DDIM" and loop:
            ax.plot(*zip(*loop), color="tab:purple", marker="x", linestyle="-.", linewidth=1.6,
                    label="diffusers' DDIMScheduler loop, measured")
        xs, ys, _ = _series(rows, OURS, "projected_s")
        if xs:
            ax.plot(xs, ys, color=_COLORS[OURS], linestyle="--", linewidth=1.3,
                    label=f"{OURS}, projected: rounds x measured batched call")
        xs, ys, _ = _series(rows, OURS, "ideal_s")
        if xs and not report["meta"]["speed_only"]:
            ax.plot(xs, ys, color=_COLORS[OURS], linestyle=":", linewidth=2.2,
                    label=f"{OURS}, ideal: rounds x one B-image call (assumption)")
        _steps_axis(ax, {r["steps"] for r in rows})
        ax.set_xlabel("sampling steps S")
        ax.set_ylabel("wall time per solve (s, log scale)")
        ax.set_title(f"{chain}, batch {batch}", fontsize=10)
    meta = report["meta"]
    parts = ["Solid: measured wall time of one solve, the median of the timed runs after a "
             f"warm-up run, on {meta['device']} ({meta['device_name']}, {meta['torch_threads']} "
             "torch threads)."]
    if report["loops"]:
        parts.append("Dash-dot (DDIM): diffusers' DDIMScheduler loop on the same network and "
                     "noise, measured in turns with our serial sampler.")
    if any(r["method"] == OURS for r in report["runs"]):
        parts.append("Dashed: projected, rounds x the measured time of one model call on the "
                     "W x B images of a round (+ the jump guess's call).")
        if not meta["speed_only"]:
            parts.append("Dotted: projected as if that batch cost no more than one call on B "
                         "images, as on a GPU below saturation: an assumption, not a measurement.")
    _finish(fig, plt, path, time_takeaway(report, batch), " ".join(parts))


def rounds_takeaway(report: dict, batch: int) -> str:
    rows = [r for r in report["runs"] if r["batch"] == batch and r["method"] == OURS
            and r["rounds"]]
    if not rows:
        return "Sequential rounds against the number of steps S"
    S = max(r["steps"] for r in rows)
    at = [r for r in rows if r["steps"] == S]
    parts = ", ".join(f"{r['rounds']} ({r['chain']})" for r in at)
    frac = [r["rounds"] / r["steps"] for r in rows]
    span = f"{min(frac):.0%}" if round(min(frac), 2) == round(max(frac), 2) else \
        f"{min(frac):.0%}-{max(frac):.0%}"
    return (f"Sequential model calls: at S={S} deqir_fast needs {parts} rounds where serial "
            f"needs {S};\nover every S measured it needs {span} of S")


def plot_rounds(report: dict, path: Path) -> None:
    plt = _pyplot()
    batch = min(r["batch"] for r in report["runs"])
    chains = _by_chain(report["runs"], batch)
    fig, axes = _panels(plt, len(chains))
    peers = list(report["meta"]["config"]["peers"])
    n = len(peers)
    for ax, (chain, rows) in zip(axes, chains.items()):
        steps = sorted({r["steps"] for r in rows})
        ax.plot(steps, steps, color="0.65", linewidth=6, alpha=0.5, solid_capstyle="butt",
                label="serial sampler: S model calls")
        for k, m in enumerate(peers):
            xs, ys, rs = _series(rows, m, "rounds")
            if not xs:
                continue
            nudge = [x * (1 + 0.025 * (k - (n - 1) / 2)) for x in xs]   # keep markers apart
            ax.plot(nudge, ys, color=_COLORS.get(m), linewidth=2.4 if m == OURS else 1.1,
                    marker=_MARKERS.get(m, "o"), markersize=6, label=m)
            bad = [(x, y) for x, y, r in zip(nudge, ys, rs) if not r["parity_ok"]]
            if bad:
                ax.scatter(*zip(*bad), facecolors="white", edgecolors=_COLORS.get(m),
                           marker=_MARKERS.get(m, "o"), s=60, linewidths=1.6, zorder=3)
        ax.scatter([], [], facecolors="white", edgecolors="0.3", marker="o", s=60,
                   label="hollow marker: that run failed parity (not converged, or > 2/255 off)")
        _steps_axis(ax, steps)
        ax.set_xlabel("sampling steps S")
        ax.set_ylabel("sequential rounds (log scale)")
        ax.set_title(f"{chain}, batch {batch}", fontsize=10)
    _finish(fig, plt, path, rounds_takeaway(report, batch),
            "Rounds of each parallel solve (one batched model call each: the sequential depth of "
            "the solve) against the serial sampler's S model calls (grey diagonal). Below the "
            "diagonal a GPU, where a batch costs about one call, can finish sooner than serial; "
            "on the diagonal the parallel solve only adds work. Markers are nudged sideways to "
            "stay apart.")


def plot_residuals(report: dict, path: Path) -> None:
    plt = _pyplot()
    batch = min(r["batch"] for r in report["runs"])
    S = max(r["steps"] for r in report["runs"])
    rows = [r for r in report["runs"] if r["batch"] == batch and r["steps"] == S
            and r["method"] != SERIAL]
    chains = _by_chain(rows, batch)
    fig, axes = _panels(plt, len(chains))
    summary: Dict[str, list] = {}
    for ax, (chain, rs) in zip(axes, chains.items()):
        tols: Dict[float, List[str]] = {}
        for r in rs:
            trace = [float("nan") if v is None else max(v, 1e-12) for v in r["residuals"] or []]
            if not trace:
                continue
            m = r["method"]
            ax.semilogy(range(1, len(trace) + 1), trace, color=_COLORS.get(m),
                        marker=_MARKERS.get(m, "o"), markersize=3.5,
                        linewidth=2.4 if m == OURS else 1.1, label=m)
            end = "" if r["parity_ok"] else ", failed parity"
            ax.annotate(f"{r['rounds']}{end}", (len(trace), trace[-1]), fontsize=7,
                        color=_COLORS.get(m), xytext=(3, 0), textcoords="offset points",
                        va="center")
            tols.setdefault(_tol_of(r), []).append(m)
            summary.setdefault(m, []).append((chain, r["rounds"], r["parity_ok"]))
        for tol, ms in tols.items():
            ax.axhline(tol, color="0.35", linestyle="--", linewidth=0.8)
            ax.annotate(f"tol {tol:g}: {', '.join(ms)}", (0.01, tol),
                        xycoords=("axes fraction", "data"), ha="left", va="bottom", fontsize=7,
                        color="0.35")
        ax.axvline(S, color="0.6", linestyle=":", linewidth=1.2)
        ax.set_xlim(0.5, S * 1.08 + 1)
        ax.set_xlabel(f"solver round (dotted: S = {S}, the serial sampler's calls)")
        ax.set_ylabel("largest residual, active steps (log)")
        ax.set_title(f"{chain}, S={S}, batch {batch}", fontsize=10)
        ax.grid(True, which="major", alpha=0.3)
    _finish(fig, plt, path, residual_takeaway(summary, S),
            "After each round of the parallel solve: the largest per-step residual "
            "max|F(X)_i - X_i| / max(noise level_i, 0.1) among the steps not yet frozen; the "
            "number at the end of a line is the solve's rounds. A solve stops once every step "
            "is under its tolerance (dashed; each configuration has its own); a line that ends "
            "above it ran S rounds (every step frozen, so exact) or hit its round budget.")


def _tol_of(row: dict) -> float:
    settings = row["settings"] if isinstance(row["settings"], dict) else {}
    return float(settings.get("tol", DEFAULT_TOL))


def residual_takeaway(summary: Dict[str, list], S: int) -> str:
    if not summary:
        return f"Residual per round at S={S}"
    chains = sorted({c for items in summary.values() for c, _, _ in items})
    fewest = {}
    for m, items in summary.items():
        for chain, rounds, ok in items:
            if ok and (chain not in fewest or rounds < fewest[chain][1]):
                fewest[chain] = (m, rounds)
    wins = [m for m, _ in fewest.values()]
    if wins:
        best = max(dict.fromkeys(wins), key=wins.count)
        head = (f"Residual per round at S={S}: {best} reaches parity in the fewest rounds on "
                f"{wins.count(best)} of {len(chains)} chains")
    else:
        head = f"Residual per round at S={S}: no run reached parity"
    failed = {m: sum(not ok for _, _, ok in items) for m, items in summary.items()}
    tail = "; ".join(f"{m} failed parity on {n} of {len(summary[m])}"
                     for m, n in failed.items() if n) or "every run reached parity"
    return f"{head}\n{tail}"


def plot_planner(report: dict, path: Path) -> None:
    """The planner's rows (``deqir_fast-auto``): the cost curve t(n) it measured, and the
    window it chose each round (1: the serial sampler), per chain at the largest S."""
    plt = _pyplot()
    batch = min(r["batch"] for r in report["runs"])
    rows = [r for r in report["runs"] if r["method"] == PLANNED and r["batch"] == batch
            and r["plan_windows"]]
    S = max(r["steps"] for r in rows)
    rows = [r for r in rows if r["steps"] == S]
    fig, (curve_ax, win_ax) = plt.subplots(1, 2, figsize=(12.8, 5.6))
    serial_rounds = []
    for r in rows:
        ns = sorted(int(n) for n in r["plan_curve"])
        line, = curve_ax.plot(ns, [1e3 * r["plan_curve"][str(n)] for n in ns], marker="o",
                              markersize=3.5, label=r["chain"])
        win_ax.step(range(1, len(r["plan_windows"]) + 1), r["plan_windows"], where="post",
                    color=line.get_color())
        serial_rounds.append(sum(w == 1 for w in r["plan_windows"]))
    curve_ax.set_xlabel("images per model call n")
    curve_ax.set_ylabel("round time t(n), ms (fastest seen)")
    curve_ax.set_title(f"cost curve measured by the planner, batch {batch}", fontsize=10)
    win_ax.set_xlabel("round")
    win_ax.set_ylabel("window (steps per round; 1 = serial sampler)")
    win_ax.set_yscale("log")
    win_ax.set_title(f"window chosen per round, S={S}", fontsize=10)
    went_serial = sum(k > 0 for k in serial_rounds)
    _finish(fig, plt, path,
            f"window='auto': the planner chose windows for {len(rows) - went_serial} of "
            f"{len(rows)} chains and the serial sampler (in part) for {went_serial}",
            "Left: the time of a round against the images in its model call, as the planner "
            "measured it on this device (each round's wall time; the fastest per size). "
            "Right: the window it chose before each round, the one that maximises the steps "
            "finalised per second under that curve and the front's advance it observed; a "
            "window of 1 is the serial sampler (docs/design.md §3e).")
