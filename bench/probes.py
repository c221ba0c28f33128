"""Probes of alternatives to the default parallel solve (Picard, linearize="secant") that
did not close issue #8's gap, on the bundled model: each row gives the rounds of the
default stopping rule, "hindsight" (the first round from which max|x0 - serial| stays
below 2/255 for every later round) and max|x0 - serial| at the stop.

    OMP_NUM_THREADS=1 python bench/probes.py init
    OMP_NUM_THREADS=1 python bench/probes.py bands
    OMP_NUM_THREADS=1 python bench/probes.py secant
    OMP_NUM_THREADS=1 python bench/probes.py stop
    OMP_NUM_THREADS=1 python bench/probes.py stop --trace DDNM-sr2
    OMP_NUM_THREADS=1 python bench/probes.py newton

init: the initial guess, passed to solve as an ``init=`` states tensor (pixel space):
"jump" (the api's default, as the string), "jump (tensor)" (the same states through
``init=``), "clip" (x̂0 clamped to [-1, 1]), "clip_e" (clamped x̂0, ε re-derived from it),
"zero" (x̂0 = 0: states sqrt(1-a')·ε̂). bands: DDIM/DDPM in an orthonormal 2-D DCT basis
with K log-spaced radial frequency bands as Jacobian classes (one secant slope per band).
secant: accumulated least squares with decay gamma; ridge toward the previous slope or
the Gaussian start with weight rho × the class's share of the step's Σ ΔU². stop: the
round at which the default rule would stop if the range-space classes' residual were
allowed c × tol while the null space must still meet tol (emulated on the default
solve's trajectory), on the DDNM chains; --trace prints one chain's per-class residuals
per round. newton: how far the linearised scan is from what a Jacobian can do. The
round's scan runs step by step with the model's exact Jacobian-vector product (Newton's
method on the whole chain: S sequential JVPs per round, so not a parallel method), or
with that JVP cut to what a diagonal J can hold: one Rayleigh quotient ⟨δ, Jδ⟩/⟨δ, δ⟩
per class along the step's actual move δ (the classes of the chain, or DCT frequency
bands), or the exact J along the step's previous move plus a scalar elsewhere. These
run --rounds rounds with no stopping rule: hindsight within them and the error after
rounds 6, 9 and --rounds are printed, beside the default solve's. Chains from
bench/calibrate.py, S = 100; the package as installed (RESULTS.md §8 ran the first four
on commit b0e108c).

These are probes, not the shipped solver: ``newton`` runs its own sequential scan;
``secant`` monkeypatches
``deqir_fast.linearize.Linearization._refit`` and ``bands`` subclasses ``dq.DDIM``;
the package is unchanged.
"""
from __future__ import annotations

import argparse
import contextlib
import math

import torch
from calibrate import GREY, chains, load

import deqir_fast as dq
from deqir_fast import linearize as L
from deqir_fast.api import _prepare

TOL = dq.api.DEFAULT_TOL
HEADER = "| chain | S | variant | rounds | hindsight | max abs x0 - serial |\n|---|---|---|---|---|---|"


def gen():
    return torch.Generator().manual_seed(2)


def problem(model_name="bundled", image=0):
    model, schedule, images = load(model_name)
    truth = images[image:image + 1].float()
    x_T = torch.randn(truth.shape, generator=torch.Generator().manual_seed(100 + image))
    return model, schedule, truth, x_T


def hindsight(errs):
    return next((k + 1 for k in range(len(errs)) if all(e < GREY for e in errs[k:])), None)


def run(model, chain, x_T, serial, **kw):
    """(rounds, hindsight, error at stop, per-round errors) of one dq.solve."""
    errs = []

    def cb(info):
        errs.append((chain.from_basis(info["state"][-1]) - serial).abs().max().item())

    res = dq.solve(model, chain, x_T, generator=gen(), callback=cb, **kw)
    return res.iterations, hindsight(errs), (res.x0 - serial).abs().max().item(), errs


def row(name, S, variant, rounds, hind, err):
    print(f"| {name} | {S} | {variant} | {rounds} | {hind or '-'} | {err:.1e} |", flush=True)


# -- init ------------------------------------------------------------------------------
def initial_guesses(system, chain):
    """The candidate initial states, in the chain's basis (as system.jump_init)."""
    c = system.coeffs
    e = system.eps_bar(c.u0.unsqueeze(0), 0)[0]
    a0 = chain.alpha[0].item()
    x0 = (c.u0 - (1 - a0) ** 0.5 * e) / a0 ** 0.5
    an = chain.alpha_next.to(c.u0).view(-1, *([1] * c.u0.dim()))
    x0c = chain.to_basis(chain.from_basis(x0).clamp(-1, 1))
    e2 = (c.u0 - a0 ** 0.5 * x0c) / (1 - a0) ** 0.5
    return {"jump (tensor)": an.sqrt() * x0 + (1 - an).sqrt() * e,
            "clip": an.sqrt() * x0c + (1 - an).sqrt() * e,
            "clip_e": an.sqrt() * x0c + (1 - an).sqrt() * e2,
            "zero": (1 - an).sqrt() * e}


def cmd_init(args):
    model, schedule, truth, x_T = problem()
    print("| chain | S | variant | initial max abs x0 - serial | rounds | hindsight | max abs x0 - serial |")
    print("|---|---|---|---|---|---|---|")
    for name, chain in chains(schedule, args.steps, truth):
        if name not in args.chains.split(","):
            continue
        serial = dq.sample_serial(model, chain, x_T, generator=gen())
        with torch.no_grad():
            system, _ = _prepare(model, chain, x_T, None, gen())
            guesses = {"jump": system.jump_init(), **initial_guesses(system, chain)}
        for variant, X in guesses.items():
            init = "jump" if variant == "jump" else chain.from_basis(X.flatten(0, 1)).view(X.shape)
            r, h, err, _ = run(model, chain, x_T, serial, init=init)
            e0 = (chain.from_basis(X[-1]) - serial).abs().max().item()
            print(f"| {name} | {args.steps} | {variant} | {e0:.1e} | {r} | {h or '-'} | {err:.1e} |",
                  flush=True)


# -- bands -----------------------------------------------------------------------------
def dct_matrix(n):
    k = torch.arange(n, dtype=torch.float64)[:, None]
    i = torch.arange(n, dtype=torch.float64)[None]
    D = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2 / n)
    D[0] /= math.sqrt(2)
    return D


class DCTDDIM(dq.DDIM):
    """DDIM in an orthonormal 2-D DCT basis, K radial frequency bands as Jacobian classes."""

    def __init__(self, *args, bands=8, **kw):
        super().__init__(*args, **kw)
        self.num_jacobian_classes = bands

    def _D(self, like):
        D = getattr(self, "_Dm", None)
        if D is None or D.shape[0] != like.shape[-1] or D.dtype != like.dtype:
            D = self._Dm = dct_matrix(like.shape[-1]).to(like)
        return D

    def to_basis(self, x):
        D = self._D(x)
        return D @ x @ D.T

    def from_basis(self, u):
        D = self._D(u)
        return D.T @ u @ D

    def _initial_state(self, x_T, y=None):
        return self.to_basis(x_T)

    def jacobian_classes(self, lo, hi, like):
        H, W = like.shape[-2:]
        f = (torch.arange(H)[:, None] ** 2 + torch.arange(W)[None] ** 2).double().sqrt()
        K = self.num_jacobian_classes
        b = torch.floor(torch.log2(f + 1) / math.log2(math.hypot(H, W) + 1) * K).clamp_max(K - 1)
        return b.to(torch.int8).view(1, 1, 1, H, W).expand(1, 1, like.shape[1], H, W)


def cmd_bands(args):
    model, schedule, truth, x_T = problem()
    ts = dq.timesteps(schedule, args.steps)
    print(HEADER)
    for eta in (0.0, 1.0):
        for bands in (0, 1, 8):
            chain = (dq.DDIM(schedule, ts, eta=eta) if bands == 0
                     else DCTDDIM(schedule, ts, eta=eta, bands=bands))
            serial = dq.sample_serial(model, chain, x_T, generator=gen())
            r, h, err, _ = run(model, chain, x_T, serial)
            row("DDIM" if eta == 0 else "DDPM", args.steps,
                "pixel basis" if bands == 0 else f"DCT, K={bands}", r, h, err)


# -- secant ----------------------------------------------------------------------------
def _sums(self, lo, hi, U, E):
    """(Σ ΔU·ΔE, Σ ΔU², moved) per (step, item, class), as the default refit has them."""
    dU = U - self._prev_U[lo:hi]
    dE = E - self._prev_E[lo:hi]
    num = self._class_sums(dU * dE, lo, hi)
    den = self._class_sums(dU * dU, lo, hi)
    scale = U.flatten(2).pow(2).sum(-1, keepdim=True) * L._MIN_RELATIVE_MOVE ** 2
    return num, den, (den > scale) & self._seen[lo:hi].view(-1, 1, 1)


def least_squares(gamma):
    """Slope = Σ_k γ^k ΔU·ΔE / Σ_k γ^k ΔU² over the rounds the step moved."""
    def _refit(self, lo, hi, U, E):
        num, den, moved = _sums(self, lo, hi, U, E)
        if not hasattr(self, "_num"):
            self._num, self._den = torch.zeros_like(self.slopes), torch.zeros_like(self.slopes)
        N = torch.where(moved, gamma * self._num[lo:hi] + num, self._num[lo:hi])
        D = torch.where(moved, gamma * self._den[lo:hi] + den, self._den[lo:hi])
        self._num[lo:hi], self._den[lo:hi] = N, D
        ok = D > 0
        slope = torch.minimum((N / torch.where(ok, D, torch.ones_like(D))).clamp_min(0), self.cap[lo:hi])
        self.slopes[lo:hi] = torch.where(ok, slope, self.slopes[lo:hi])
    return _refit


def ridge(rho, toward):
    """Slope = (ΔU·ΔE + ρ w s_ref) / (ΔU² + ρ w), w = the class's share of the step's
    elements × Σ ΔU² over all classes; s_ref the previous slope or the Gaussian start."""
    def _refit(self, lo, hi, U, E):
        num, den, moved = _sums(self, lo, hi, U, E)
        if not hasattr(self, "_prior"):
            self._prior = self.slopes.clone()            # the Gaussian start
            if self.num_classes > 1:
                ids = self.chain.jacobian_classes(0, self.chain.num_steps, self.like)
                n = torch.stack([(ids == k).expand(-1, -1, *self.like.shape[1:]).flatten(1).sum(1)
                                 for k in range(self.num_classes)], -1).to(self.like.dtype)
                self._frac = (n / n.sum(-1, keepdim=True)).unsqueeze(1)       # [S, 1, K]
            else:
                self._frac = torch.ones_like(self.slopes[:, :1])
        ref = rho * self._frac[lo:hi] * den.sum(-1, keepdim=True)
        target = self._prior[lo:hi] if toward == "prior" else self.slopes[lo:hi]
        slope = (num + ref * target) / torch.where(den + ref > 0, den + ref, torch.ones_like(den))
        slope = torch.minimum(slope.clamp_min(0), self.cap[lo:hi])
        self.slopes[lo:hi] = torch.where(moved, slope, self.slopes[lo:hi])
    return _refit


@contextlib.contextmanager
def refit(fn):
    old = L.Linearization._refit
    if fn is not None:
        L.Linearization._refit = fn
    try:
        yield
    finally:
        L.Linearization._refit = old


SECANTS = {"default": None,
           "least squares, gamma 0.5": least_squares(0.5),
           "least squares, gamma 0.9": least_squares(0.9),
           "ridge to previous, rho 0.3": ridge(0.3, "prev"),
           "ridge to previous, rho 1": ridge(1.0, "prev"),
           "ridge to previous, rho 3": ridge(3.0, "prev"),
           "ridge to Gaussian, rho 0.3": ridge(0.3, "prior")}


def cmd_secant(args):
    model, schedule, truth, x_T = problem()
    print(HEADER)
    for name, chain in chains(schedule, args.steps, truth):
        if name not in args.chains.split(","):
            continue
        serial = dq.sample_serial(model, chain, x_T, generator=gen())
        for variant, fn in SECANTS.items():
            with refit(fn):
                r, h, err, _ = run(model, chain, x_T, serial)
            row(name, args.steps, variant, r, h, err)


# -- stop ------------------------------------------------------------------------------
def class_residuals(model, chain, x_T, serial):
    """The default solve, and per round (from round 2): max over steps of the scaled
    state change of each Jacobian class (= the rule's residual, restricted to the
    class; Picard takes F(X)) and max|x0 - serial|."""
    with torch.no_grad():
        system, _ = _prepare(model, chain, x_T, None, gen())
    scale = system.residual_scale(dq.api.DEFAULT_FLOOR).view(-1, 1, 1, 1, 1).to(x_T)
    ids = chain.jacobian_classes(0, chain.num_steps, x_T)
    prev, rounds = [None], []

    def cb(info):
        X = info["state"].clone()
        err = (chain.from_basis(X[-1]) - serial).abs().max().item()
        per = [None] * chain.num_jacobian_classes
        if prev[0] is not None:
            d = (X - prev[0]).abs() * scale
            per = [torch.where((ids == k).expand_as(d), d, 0).max().item() if bool((ids == k).any()) else 0.0
                   for k in range(chain.num_jacobian_classes)]
        rounds.append((per, err))
        prev[0] = X

    res = dq.solve(model, chain, x_T, generator=gen(), callback=cb)
    return res, rounds


def cmd_stop(args):
    if args.trace:
        model, schedule, truth, x_T = problem(args.model, args.image)
        chain = dict(chains(schedule, args.steps, truth, seed=args.image))[args.trace]
        serial = dq.sample_serial(model, chain, x_T, generator=gen())
        res, rounds = class_residuals(model, chain, x_T, serial)
        print(f"{args.model} image {args.image}; residuals in units of tol · max(σ_i, floor), "
              f"i.e. the default rule stops when every column is <= 1\n")
        print("| chain | S | round | null space (class 0) | range (classes 1, 2) | max abs x0 - serial |")
        print("|---|---|---|---|---|---|")
        for k, (per, err) in enumerate(rounds):
            null = "-" if per[0] is None else f"{per[0] / TOL:.3g}"
            rng = "-" if per[0] is None else f"{max(per[1:]) / TOL:.3g}"
            print(f"| {args.trace} | {args.steps} | {k + 1} | {null} | {rng} | {err:.1e} |", flush=True)
        return
    print(HEADER)
    for model_name, image in (("bundled", 0), ("bundled", 1), ("photo16", 0)):
        model, schedule, truth, x_T = problem(model_name, image)
        for name, chain in chains(schedule, args.steps, truth, seed=image):
            if not name.startswith("DDNM"):
                continue
            serial = dq.sample_serial(model, chain, x_T, generator=gen())
            res, rounds = class_residuals(model, chain, x_T, serial)
            errs = [e for _, e in rounds]
            label = f"{model_name} img{image} {name}"
            h = hindsight(errs)
            row(label, args.steps, "default", res.iterations, h, (res.x0 - serial).abs().max().item())
            for c in (math.inf, 30, 10, 3):
                k = next((j for j, (p, _) in enumerate(rounds)
                          if p[0] is not None and p[0] <= TOL and max(p[1:]) <= c * TOL), None)
                variant = f"range allowed {c:g} × tol".replace("inf", "∞")
                if k is None:
                    print(f"| {label} | {args.steps} | {variant} | never | {h or '-'} | - |", flush=True)
                else:
                    row(label, args.steps, variant, k + 1, h, errs[k])


# -- newton ----------------------------------------------------------------------------
def jvp_of(system, chain, model):
    """(u, i, v) -> ∂ē/∂u at state u of step i along v (autograd's double-backward JVP:
    the UNet's group norm and fused attention have no forward-mode rule; attention runs
    its plain-math kernel, whose backward is twice differentiable)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def ebar(u, i):
        t = system.timesteps[i:i + 1].repeat(u.shape[0])
        return chain.to_basis(model(chain.from_basis(u), t))

    def jvp(u, i, v):
        with sdpa_kernel(SDPBackend.MATH):
            return torch.autograd.functional.jvp(lambda w: ebar(w, i), (u.contiguous(),),
                                                 (v.contiguous(),))[1]
    return jvp


def class_rayleigh(chain, i, d, jd):
    """Jd reduced to one scalar per Jacobian class: Σ d·Jd / Σ d² on each class, times d."""
    ids = chain.jacobian_classes(i, i + 1, d)
    if ids is None:
        return (d * jd).sum() / (d * d).sum() * d        # d moved: the caller checked
    ids = ids[0].expand_as(d)
    out = torch.zeros_like(d)
    for k in ids.unique():
        m = ids == k
        dd = (d * d)[m].sum()
        if dd > 0:                                     # a class that did not move keeps 0
            out[m] = (d * jd)[m].sum() / dd * d[m]
    return out


def newton_rounds(model, chain, x_T, serial, variant, rounds):
    """max|x0 - serial| after each round of the scan u_{i+1} = P u + Q (E_i + J·(u - U_i))
    + R run step by step, with J·δ given by ``variant`` (see the module docstring)."""
    with torch.no_grad():
        system, _ = _prepare(model, chain, x_T, None, gen())
        X, _ = dq.api.initial_states(system)
    c, S = system.coeffs, chain.num_steps
    jvp = jvp_of(system, chain, model)
    U_prev, errs = None, []
    for _ in range(rounds):
        with torch.no_grad():
            U = system.inputs(X, 0, S)
            E = system.eps_bar(U, 0, check_finite=False)
        if not bool(torch.isfinite(E).all()):          # the scan diverged: no more rounds
            errs += [math.inf] * (rounds - len(errs))
            break
        u, X = c.u0, torch.empty_like(X)
        for i in range(S):
            d = u - U[i]
            if not bool(d.any()):
                jd = torch.zeros_like(d)
            elif variant.startswith("previous move"):
                v = d if U_prev is None or not bool((U[i] - U_prev[i]).any()) else U[i] - U_prev[i]
                jv = jvp(U[i], i, v)
                s = (v * jv).sum() / (v * v).sum()
                g = jv - s * v                 # J = s I + g vᵀ/|v|² (+ its transpose): Jv exact
                jd = s * d + g * (v * d).sum() / (v * v).sum()
                if variant.endswith("symmetric"):
                    jd = jd + v * (g * d).sum() / (v * v).sum()
            else:
                jd = jvp(U[i], i, d)
                if variant != "exact (Newton)":
                    jd = class_rayleigh(chain, i, d, jd)
            with torch.no_grad():
                u = c.P[i] * u + c.Q[i] * (E[i] + jd) + (0 if c.R is None else c.R[i])
            X[i] = u.detach()
        U_prev = U
        errs.append((chain.from_basis(X[-1]) - serial).abs().max().item())
    return errs


NEWTON_VARIANTS = ("exact (Newton)", "per-class Rayleigh along δ",
                   "previous move exact, scalar elsewhere", "previous move exact, symmetric")


def cmd_newton(args):
    model, schedule, truth, x_T = problem()
    ts = dq.timesteps(schedule, args.steps)
    todo = [(n, c) for n, c in chains(schedule, args.steps, truth) if n in args.chains.split(",")]
    todo += [(f"DDIM, DCT {k} bands", DCTDDIM(schedule, ts, bands=k)) for k in (8, 32)
             if "DDIM-DCT" in args.chains.split(",")]
    cols = sorted({min(6, args.rounds), min(9, args.rounds), args.rounds})
    print("| chain | S | J in the scan | hindsight | max abs x0 - serial after round "
          + " / ".join(map(str, cols)) + " |\n|---|---|---|---|---|")
    for name, chain in todo:
        serial = dq.sample_serial(model, chain, x_T, generator=gen())
        r, h, err, errs = run(model, chain, x_T, serial)
        row_ = lambda v, e: print(f"| {name} | {args.steps} | {v} | {hindsight(e) or '-'} | "  # noqa: E731
                                  + " / ".join(f"{e[k - 1]:.1e}" if k <= len(e) else "-"
                                               for k in cols) + " |", flush=True)
        row_(f"secant (the default solve: {r} rounds)", errs)
        variants = NEWTON_VARIANTS if name == "DDIM" else \
            NEWTON_VARIANTS[1:2] if "DCT" in name else NEWTON_VARIANTS[:2]
        for v in variants:
            row_(v, newton_rounds(model, chain, x_T, serial, v, args.rounds))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="probe", required=True)
    for name, chains_default in (("init", "DDIM,DDPM,DDRM-inp,DDNM-sr2"), ("bands", ""),
                                 ("secant", "DDIM,DDRM-inp,DDNM-sr2,DDNM-inp"), ("stop", ""),
                                 ("newton", "DDIM,DDIM-DCT,DDIM-eta0.5,DDPM,DDRM-inp,DDNM-sr2,DDNM-inp,DDNM+-sr2")):
        s = sub.add_parser(name)
        s.add_argument("--steps", type=int, default=100)
        if chains_default:
            s.add_argument("--chains", default=chains_default)
        if name == "stop":
            s.add_argument("--trace", default="", help="one chain: its per-class residuals per round")
            s.add_argument("--model", default="bundled", choices=["bundled", "photo16"])
            s.add_argument("--image", type=int, default=0)
        if name == "newton":
            s.add_argument("--rounds", type=int, default=12)
    args = p.parse_args()
    torch.set_num_threads(1)
    {"init": cmd_init, "bands": cmd_bands, "secant": cmd_secant, "stop": cmd_stop,
     "newton": cmd_newton}[args.probe](args)


if __name__ == "__main__":
    main()
