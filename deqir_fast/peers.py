"""Published parallel samplers as configurations of ``solve``, for side-by-side runs in one
process (bench/peers.py, ``deqir-fast bench``). Each entry is the keyword arguments that
make our solver run the peer's algorithm; the model, chain and noise stay the same.
Unless an entry sets ``init``, a peer also gets our initial guess (``init="auto"``) and,
in a sliding window, our start for the steps entering it (docs/design.md §3c; the
published ParaDiGMS starts them from a copy and every state from x_T): the comparison
then isolates the update rule, the Jacobian guess and the freeze rule, and errs in the
peers' favour. The serial shadow (docs/design.md §3d) is ours: peers run without it, as
published.

- ParaDiGMS (Shih et al., NeurIPS 2023; diffusers' Paradigms pipeline): Picard on the
  sums of drifts, which is the linearised scan with J = (1 - P)/Q; a sliding window;
  steps leave the window as soon as their error meets the tolerance
  (``freeze_ratio=1``). diffusers ships ``tolerance=0.1`` and ``parallel=10``. Their
  error is an RMS over the image in noise units, ours a max, so the same number is
  stricter here.
- DeqIR / DEQ-DDIM (Cao et al., CVPR 2024; Pokle et al., NeurIPS 2022): Anderson
  acceleration per step on the plain map (J = 0), every state initialised to x_T, a
  budget of 15 rounds.
- ParaTAA (Tang et al., ICML 2024): triangular Anderson on the plain map.

``deqir_fast-auto`` is ours with ``window="auto"``: the throughput planner picks the window
per round, or the serial sampler (docs/design.md §3e).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict

from .solvers import SolveOptions
from .solvers.options import FIELDS

PEERS: Dict[str, dict] = {
    "deqir_fast": {},
    "ParaDiGMS": dict(solver="picard", linearize="paradigms", tol=0.1,
                      options=SolveOptions(freeze_ratio=1.0, serial_shadow=False)),
    "DeqIR": dict(solver="anderson", linearize="none", init="x_T", max_iter=15,
                  options=SolveOptions(serial_shadow=False)),
    "ParaTAA": dict(solver="triangular_anderson", linearize="none",
                    options=SolveOptions(serial_shadow=False)),
    "deqir_fast-auto": dict(window="auto"),
}
PLANNED = "deqir_fast-auto"


def peer(name: str, **overrides) -> dict:
    """The ``solve`` keyword arguments of peer ``name``, with ``overrides`` applied (e.g.
    a tuned ``tol``, a ``window``, or a ``SolveOptions`` field such as ``freeze_ratio``,
    which goes into the peer's ``options``)."""
    if name not in PEERS:
        raise ValueError(f"peer must be one of {tuple(PEERS)}, got {name!r}")
    kw = dict(PEERS[name])
    expert = {k: overrides.pop(k) for k in list(overrides) if k in FIELDS}
    if expert:
        kw["options"] = replace(kw.get("options", SolveOptions()), **expert)
    kw.update(overrides)
    return kw
