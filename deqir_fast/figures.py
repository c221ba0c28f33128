"""The command line's figures: image grids with a caption under each image, and the
convergence of parallel solves. matplotlib is imported here only, with the Agg backend
(files, no window). Each function writes to a path in a given format, so the caller can
write to a temporary file first (see ``image_io.write_all``). numpy and torch are
imported inside the functions, so that importing this module stays cheap."""
from __future__ import annotations

import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence


@dataclass
class Cell:
    """One image of a grid (H x W x C in [0, 1]; None leaves the cell blank) and the
    line printed under it."""
    pixels: Optional[np.ndarray]
    caption: str = ""


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def image_grid(rows: Sequence[tuple], columns: Sequence[str], path: Path, title: str = "",
               caption: str = "") -> None:
    """``rows``: (row label, [Cell per column]). Column titles on top, each cell's caption
    under it, an optional figure title and a caption paragraph at the bottom."""
    plt = _pyplot()
    n_rows, n_cols = len(rows), len(columns)
    caption_lines = textwrap.wrap(caption, 22 * n_cols) if caption else []
    top, bottom = (0.6 if title else 0.3), 0.15 + 0.17 * len(caption_lines)
    cell = 1.75
    fig, axes = plt.subplots(n_rows, n_cols, squeeze=False,
                             figsize=(cell * n_cols + 0.6, cell * n_rows * 1.12 + top + bottom))
    for r, (label, cells) in enumerate(rows):
        for c, item in enumerate(cells):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            if item.pixels is None:
                for side in ax.spines.values():
                    side.set_visible(False)
            else:
                img = item.pixels
                grey = img.shape[-1] == 1
                ax.imshow(img[..., 0] if grey else img, cmap="gray" if grey else None,
                          vmin=0, vmax=1, interpolation="nearest")
            ax.set_xlabel(item.caption, fontsize=8, labelpad=2)
            if r == 0:
                ax.set_title(columns[c], fontsize=9)
        axes[r, 0].set_ylabel(label, fontsize=9)
    height = fig.get_figheight()
    fig.subplots_adjust(left=0.4 / fig.get_figwidth() + 0.02, right=0.99,
                        top=1 - top / height, bottom=bottom / height, hspace=0.32, wspace=0.06)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.08 / height, va="top")
    if caption_lines:
        fig.text(0.5, 0.06 / height, "\n".join(caption_lines), ha="center", va="bottom",
                 fontsize=7.5, color="0.25")
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)


def frozen_front(trace, converged: bool) -> List[int]:
    """Steps final after each round, from a solve's ``residuals`` [rounds, S]: a round's
    first active step (the first non-NaN residual of the next round) is the number of
    steps frozen before it; after the last round all S are final if it converged."""
    import torch
    S = trace.shape[1]
    front = []
    for row in trace[1:]:
        active = (~torch.isnan(row)).nonzero()
        front.append(int(active[0]) if len(active) else S)
    if len(trace):
        front.append(S if converged else front[-1] if front else 0)
    return front


# Line styles that stay apart when curves coincide: later curves are drawn thinner on top
# of earlier, wider ones, and each has its own dash pattern and marker.
_STYLES = [("-", "o"), ("--", "s"), ("-.", "^"), (":", "D"), ((0, (5, 1, 1, 1)), "v"),
           ((0, (1, 1)), "P"), ((0, (8, 2)), "X"), ((0, (3, 1, 1, 1, 1, 1)), "*")]


def convergence_plot(traces: Dict[str, dict], path: Path, tol: float, label: str) -> None:
    """Per solve (``traces[name] = {"residuals", "converged"}``): the convergence front and
    the largest residual among the steps still active after each round. ``label`` names
    the chain (e.g. ``"DDRM-20"``) in the title, which states the rounds per task."""
    plt = _pyplot()
    fig = convergence_figure(traces, tol, label)
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def convergence_figure(traces: Dict[str, dict], tol: float, label: str):
    """The figure ``convergence_plot`` saves. One legend serves both panels; it sits under
    them, outside the axes, because inside it covered curves (the fronts fill the left
    panel's lower right, where it was)."""
    import numpy as np
    import torch
    plt = _pyplot()
    n = len(traces)
    columns = 3
    legend_rows = -(-(n + 2) // columns)          # the solves, serial band and tol line
    caption = ("Left: after each round of the parallel solve, how many of the S steps are "
               "final (frozen: they equal the serial sampler's states to the tolerance). "
               "The serial sampler finalises one step per model call (grey band); a curve "
               "above it needs fewer sequential model calls. Right: the largest per-step "
               "residual max|F(X)_i - X_i| / noise level among the steps not yet frozen; "
               "the solve stops when every step is under tol (leading steps freeze earlier, "
               "once the steps before them are under tol x freeze_ratio). \"J = 0\" is the "
               "same solve without the linearised scan. Curves that coincide are shifted "
               "apart by a fraction of a step.")
    caption_lines = textwrap.wrap(caption, 175)
    # Heights in inches: title, axes with their labels, legend, caption.
    title_h, axes_h = 0.35, 4.0
    legend_h = 0.17 * legend_rows + 0.1
    caption_h = 0.13 * len(caption_lines) + 0.12
    height = title_h + axes_h + legend_h + caption_h
    fig, (front_ax, resid_ax) = plt.subplots(1, 2, figsize=(11, height))
    S = max(t["residuals"].shape[1] for t in traces.values())
    rounds_of = {name: len(t["residuals"]) for name, t in traces.items()}
    # Behind everything: the serial sampler, one step per "round".
    front_ax.plot([0, S], [0, S], color="0.85", linewidth=7, solid_capstyle="butt",
                  label="serial: 1 step per model call", zorder=0)
    # Curves that coincide (several tasks advancing one step per round) are nudged apart
    # by a fraction of a step, so that each stays visible; the caption says so.
    spacing = 0.012 * S
    for k, (name, t) in enumerate(traces.items()):
        trace = t["residuals"]
        rounds = np.arange(1, len(trace) + 1)
        dash, marker = _STYLES[k % len(_STYLES)]
        width = 1.0 + 2.2 * (n - 1 - k) / max(n - 1, 1)
        style = dict(linestyle=dash, marker=marker, linewidth=width, markersize=3 + width,
                     markerfacecolor="none", label=f"{name}: {plural(len(trace), 'round')}",
                     zorder=2 + k)
        offset = (k - (n - 1) / 2) * spacing
        front_ax.plot(rounds, np.asarray(frozen_front(trace, t["converged"])) + offset, **style)
        worst = torch.nan_to_num(trace, nan=0.0, posinf=float("nan")).amax(1).clamp_min(1e-12)
        resid_ax.semilogy(rounds, worst.numpy(), **style)
    margin = (n / 2 + 0.5) * spacing + 0.2          # room for the shifted curves
    front_ax.set_xlim(0, S + 0.5)
    front_ax.set_ylim(-margin, S + margin)
    from matplotlib.ticker import MaxNLocator
    for axis in (front_ax.xaxis, front_ax.yaxis, resid_ax.xaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    front_ax.set_xlabel("solver round (one batched model call each)")
    front_ax.set_ylabel(f"steps final (of {S})")
    front_ax.set_title("convergence front: above the grey band beats serial", fontsize=10)
    tol_line = resid_ax.axhline(tol, color="k", linestyle="--", linewidth=0.8,
                                label=f"tol {tol:g} (right)")
    resid_ax.set_xlabel("solver round")
    resid_ax.set_ylabel("largest residual of the active steps (noise units)")
    resid_ax.set_title("residual (lines as on the left)", fontsize=10)
    fig.suptitle(convergence_takeaway(rounds_of, S, label), fontsize=11)
    bottom = (legend_h + caption_h) / height
    fig.tight_layout(rect=(0, bottom, 1, 1))        # it leaves room for the suptitle
    handles = front_ax.get_lines() + [tol_line]
    fig.legend(handles=handles, labels=[h.get_label() for h in handles], loc="upper center",
               bbox_to_anchor=(0.5, bottom), ncol=columns, fontsize=7.5, frameon=False)
    fig.text(0.5, 0.06 / height, "\n".join(caption_lines), ha="center", va="bottom",
             fontsize=7.5, color="0.25")
    return fig


def plural(count: int, word: str, words: Optional[str] = None) -> str:
    """``1 round``, ``2 rounds`` (``words``: an irregular plural)."""
    return f"{count} {word if count == 1 else (words or word + 's')}"


def convergence_takeaway(rounds_of: Dict[str, int], S: int, label: str) -> str:
    """One sentence for the title: how many rounds the solves took against S steps. A
    comparison run without the linearised scan ("..., J = 0 ...") gets its own clause."""
    plain = {name: r for name, r in rounds_of.items() if "J = 0" in name}
    rounds_of = {name: r for name, r in rounds_of.items() if name not in plain}
    extra = "".join(f"; {name.split(',')[0]} without the linearised scan: {r}"
                    for name, r in plain.items())
    steps = plural(S, "serial step")
    fewer = sorted((r, name) for name, r in rounds_of.items() if r < S)
    if not fewer:
        return (f"{label} in parallel: every solve needs all {plural(S, 'round')}, as many "
                f"as serial steps{extra}")
    if len(fewer) == len(rounds_of):
        lo, hi = fewer[0][0], fewer[-1][0]
        span = plural(lo, "round") if lo == hi else f"{lo} to {hi} rounds"
        return f"{label} in parallel: every solve finishes in {span} instead of {steps}{extra}"
    names = " and ".join(f"{name} in {plural(r, 'round')}" for r, name in fewer)
    rest = len(rounds_of) - len(fewer)
    return (f"{label} in parallel: {names} instead of {steps}; "
            f"the other {rest} need{'s' if rest == 1 else ''} all {S}{extra}")
