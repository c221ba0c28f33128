"""The whole sampling chain as one fixed-point system X = F(X) (docs/design.md §2.7).

X stacks the states after each step, [S, B, C, H, W], in the chain's basis. A round
takes the inputs U of a window of steps (the carry and the states before each step),
runs the denoiser on all of them in one batched call (``model_term``), then rebuilds the
states with the (linearised) affine scan (``scan``). F is triangular: output i depends
only on states before i.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from ._checks import raise_nonfinite
from .chains import Chain, StepCoefficients
from .linearize import Linearization
from .ops import CHUNK_ELEMENTS, affine_scan, affine_step, step_residuals
from .ops.fused_round import fused_round, step_table, window_coefficients
from .ops.layout import C_Q0, C_R, C_SN

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def ieee_float32(device: torch.device, allow_tf32: bool = False):
    """Run float32 matmuls and convolutions in IEEE float32 on CUDA (no TF32) unless
    ``allow_tf32``. TF32 rounds inputs to 10 mantissa bits and its kernels depend on the
    batch, so a state evaluated in a batch of W*B differs from the same state evaluated
    alone by ~1e-3, and DDIM's chain amplifies that: measured on an H200 (bundled
    model, DDIM-100, bench/RESULTS.md §11) parallel vs serial max|x0 diff| was 1.2e-2
    (B=1) and 3.2e-2 (B=8) with TF32, 2.9e-4 and 8.1e-5 without. ``converged=True``
    promises the serial answer, so TF32 is off inside the model calls by default.
    The flags are process-wide: they are restored on exit."""
    if allow_tf32 or device.type != "cuda":
        yield
        return
    matmul, conv = torch.backends.cuda.matmul, getattr(torch.backends.cudnn, "conv", None)
    if hasattr(matmul, "fp32_precision") and hasattr(conv, "fp32_precision"):
        # torch >= 2.9: the new API (mixing it with allow_tf32 raises on later reads)
        saved = matmul.fp32_precision, conv.fp32_precision
        matmul.fp32_precision = conv.fp32_precision = "ieee"
        try:
            yield
        finally:
            matmul.fp32_precision, conv.fp32_precision = saved
    else:
        saved = matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            yield
        finally:
            matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def call_model(model: Model, x: torch.Tensor, t: torch.Tensor, first_step: int,
               batch: int, check_finite: bool = True, allow_tf32: bool = False) -> torch.Tensor:
    """eps = model(x, t), checked: same shape as x and (with ``check_finite``) finite,
    naming the failing step. The parallel solver checks finiteness itself, through
    the residuals it reads back anyway. No TF32 on CUDA unless ``allow_tf32``
    (``ieee_float32``)."""
    with ieee_float32(x.device, allow_tf32):
        e = model(x, t)
    if hasattr(e, "sample") and not isinstance(e, torch.Tensor):   # diffusers output
        e = e.sample
    if not isinstance(e, torch.Tensor):
        raise TypeError(f"model must return a tensor, got {type(e).__name__}")
    if e.shape != x.shape:
        raise ValueError(f"model output has shape {tuple(e.shape)} at step {first_step}, "
                         f"expected {tuple(x.shape)} (the input's shape)")
    if check_finite:
        finite = torch.isfinite(e).flatten(1).all(1)
        if not bool(finite.all()):
            raise_nonfinite(int((~finite).nonzero()[0, 0]) // batch + first_step)
    return e.to(x.dtype)


# DDNM's derived range elements (``ChainSystem._derived_weights``): their one-step leak
# factors are summed over the steps within this fraction of the schedule's timesteps, the
# spacing of S = 100 on which the weighting was calibrated (bench/RESULTS.md §8).
DERIVED_SPAN = 0.01


class ChainSystem:
    """F restricted to a window of steps, plus what the solvers need to know."""

    def __init__(self, model: Model, chain: Chain, coeffs: StepCoefficients,
                 allow_tf32: bool = False):
        self.model = model
        self.allow_tf32 = allow_tf32
        self.chain = chain
        self.coeffs = coeffs
        self.batch = coeffs.u0.shape[0]
        self.timesteps = chain.timesteps.to(coeffs.u0.device)
        # step indices on the device: the serial shadow's step is a device index, so a
        # captured round can advance it (docs/design.md §3d)
        self._step_ids = torch.arange(chain.num_steps, device=coeffs.u0.device)
        # An order-2 chain (DPM-Solver++(2M), docs/design.md §2.8): step i also reads the
        # input and model output of step i-1 through C_i u_{i-1} + D_i ē_{i-1}; the scan
        # carries both (linearised like ē). A window from lo > 0 evaluates the state
        # entering step lo-1 as one more row of its model call (``inputs`` puts it in the
        # same buffer, the model call records it in ``_previous`` for the scan).
        previous = chain.previous_coefficients()
        self.order = 1 if previous is None else 2
        if previous is not None:
            like = coeffs.u0
            view = (-1,) + (1,) * like.dim()
            self._C, self._D = (c.to(device=like.device, dtype=like.dtype).view(view)
                                for c in previous)
        self._pending = None       # (lo, inputs buffer with the previous row last)
        self._previous = None      # (lo, u_{lo-1}, ē_{lo-1}) of the last model call
        self.previous_rows = 0     # those rows' step evaluations (the solve adds them to nfe)
        # DDIM, DDRM and DDNM: the fused round computes P, Q and R per element in-kernel
        # from a [S, NS] float64 table of per-step scalars and the singular values (one
        # item's worth, in the state dtype); coeffs.P/Q/R are never materialised.
        self.spec = chain.kernel_spec()
        if self.spec is not None:
            like = coeffs.u0
            self._table = step_table(self.spec).to(like.device)
            s = self.spec.singulars
            self._s = None if s is None else \
                s.to(device=like.device, dtype=like.dtype).expand(like.shape[1:]).contiguous()
            self._ones = torch.ones(self.num_steps, dtype=torch.float64, device=like.device)

    @property
    def num_steps(self) -> int:
        return self.chain.num_steps

    def residual_scale(self, floor: float) -> torch.Tensor:
        """[S] float64: residuals are measured in units of max(σ_i, floor). Also sets
        the DDNM weights for this floor (``_derived_weights``), which every later
        ``residuals``/``round_and_residuals`` call of the solve uses: each solver loop
        calls this once, before its first round."""
        scale = 1.0 / self.chain.noise_levels.clamp_min(floor)
        self._derived_weight = self._derived_weights(scale)
        return scale

    def _derived_weights(self, scale: torch.Tensor) -> Optional[torch.Tensor]:
        """[S] weights (state's device) of DDNM's range-space elements with λ = 1 in the
        residual, or None for every other chain (docs/design.md §3b).

        Such an element has P = 0: the state is sqrt(a')ȳ/s + Q ē, derived from the model
        call, and x0's range part is ȳ/s whatever it holds. A change d in it (noise units
        of state i) moves the next state's other elements only through the next model
        call: by at most max|Q_other(i+1)|·L(i+1)·d (noise units of state i+1), with
        L = 1/sqrt(1-ᾱ) the Lipschitz bound of ∂ε/∂x (the secant's cap) and Q_other the
        null space's Q or, with σ_y > 0, the largest |Q| of the λ < 1 elements (DDNM+:
        |Q| = sqrt(a')(1-λ)sqrt(1-a)/sqrt(a), largest at the smallest singular value).
        That factor is one step's leak, and it shrinks with the step: 0.05-0.14 at
        S = 100 (σ_y = 0), < 0.01 at S = 1000. But a derived error does not stop after one
        step: the next derived elements inherit it through the model, and each later step
        leaks again. So the weight sums the one-step factors over the steps within
        1/100 of the schedule's timesteps (``DERIVED_SPAN``) from step i, capped at 1: at
        S ≤ 100 on a 1000-step schedule that is the one-step factor, on which the rule
        was calibrated; at S = 1000 it is about the same weight again (ten steps), where
        the one-step factor let DDNM SR×2 on photo16 stop 9.1e-3 off serial with
        ``converged=True`` (RESULTS §8). The last steps within the span get weight 1
        (the last step's own is 1), and a spacing finer than the span anywhere sums
        several steps: both only make the rule stricter. The rule is calibrated, not
        proven (§3b)."""
        if self.spec is None or self.spec.sampler != "ddnm":
            return None
        S = self.num_steps
        T = self._table.cpu()
        q_other = T[:, C_Q0].abs()
        sigma_y = float(self.spec.sigma_y)
        if sigma_y > 0:
            s = self.spec.singulars.to(torch.float64)
            s_min = float(s[s > 0].min()) if bool((s > 0).any()) else 0.0
            r, sn, a = T[:, C_R], T[:, C_SN], self.chain.alpha
            partial = (s_min > 0) & (sn * s_min < r * sigma_y)        # λ < 1 at s_min
            lam = sn * s_min / (r * sigma_y)
            q2 = r * (1 - lam) * (1 - a).sqrt() / a.sqrt()
            q_other = torch.where(partial, torch.maximum(q_other, q2.abs()), q_other)
        cap = (1.0 - self.chain.alpha).rsqrt()
        w = torch.ones(S, dtype=torch.float64)
        if S > 1:
            w[:-1] = (q_other[1:] * cap[1:] * scale[1:] / scale[:-1]).clamp_max(1.0)
        # the sum over steps i .. k_i - 1, the steps whose timestep is within the span
        # of step i's (timesteps decrease along the chain)
        t = self.chain.timesteps.to(torch.float64)
        span = DERIVED_SPAN * self.chain.schedule.alphas_cumprod.numel()
        k = torch.searchsorted(-t, -t + span, side="left")
        c = torch.cat([torch.zeros(1, dtype=torch.float64), w.cumsum(0)])
        w = (c[k] - c[:-1]).clamp_max(1.0)
        return w.to(device=self.coeffs.u0.device, dtype=self.coeffs.u0.dtype)

    def residuals(self, D: torch.Tensor, lo: int, hi: int, scale: torch.Tensor) -> torch.Tensor:
        """Per-step residual max|D_i| * scale_i ([hi-lo] float64) of a change D = F(X) - X
        of steps lo..hi-1, with DDNM's derived range elements weighted
        (``_derived_weights``). NaN-sticky."""
        w = getattr(self, "_derived_weight", None)
        if w is None:
            return step_residuals(D).to(torch.float64) * scale
        return self._weighted_max(D, None, lo, hi, w).to(torch.float64) * scale

    def _weighted_max(self, A: torch.Tensor, B: Optional[torch.Tensor], lo: int, hi: int,
                      w: torch.Tensor) -> torch.Tensor:
        """max over each step's elements of |A - B| (|A| when B is None), DDNM's derived
        elements (``DDNM.jacobian_classes`` == 1, from device copies of the step table:
        no host copy in the round) times w_i; in chunks of steps, so the temporaries stay
        a few MB (not window-sized: bench/round.py --memory)."""
        out = torch.empty(hi - lo, dtype=A.dtype, device=A.device)
        pad = (1,) * (A.dim() - 1)
        per = max(1, CHUNK_ELEMENTS // max(1, A[0:1].numel()))     # A may hold no steps
        for c in range(0, hi - lo, per):
            e = min(c + per, hi - lo)
            derived = self.chain.jacobian_classes(lo + c, lo + e, A) == 1     # [n, 1, C, H, W]
            D = A[c:e] if B is None else A[c:e] - B[c:e]
            D = D.abs_() if B is not None else D.abs()
            D = torch.where(derived, D * w[lo + c:lo + e].view(-1, *pad), D)
            out[c:e] = D.flatten(1).amax(1)
        return out

    def carry(self, X: torch.Tensor, lo: int) -> torch.Tensor:
        """The state entering step ``lo``."""
        return self.coeffs.u0 if lo == 0 else X[lo - 1]

    def eps_bar(self, U: torch.Tensor, lo: int, check_finite: bool = True,
                steps: Optional[torch.Tensor] = None) -> torch.Tensor:
        """ē for the states U = [W, B, ...] entering steps lo .. lo+W-1 (one model call),
        or the steps ``steps`` names ([W] int64 on the device) when given."""
        W, B = U.shape[:2]
        x = self.chain.from_basis(U.reshape(W * B, *U.shape[2:]))
        t = self.timesteps[lo:lo + W] if steps is None else self.timesteps.index_select(0, steps)
        e = call_model(self.model, x, t.repeat_interleave(B), lo, B, check_finite, self.allow_tf32)
        return self.chain.to_basis(e).view_as(U)

    def inputs_and_model_term_with_shadow(self, X: torch.Tensor, lo: int, hi: int,
                                          u: torch.Tensor, p: torch.Tensor):
        """``inputs`` and ``model_term`` with the serial shadow's state u [B, ...],
        entering step p (a one-element int64 tensor on the state's device, so a captured
        round can advance it), as one more row of the same model call: (U, ē(U), ē(u)).
        The row is built into the inputs' own buffer (no second copy of the window) and
        costs one step evaluation, not a second call (docs/design.md §3d)."""
        W = hi - lo
        U_all = self.inputs(X, lo, hi, extra=u)                   # [W + 1, B, ...]
        steps = torch.cat([self._step_ids[lo:hi], p])
        E_all = self._call(U_all, lo, steps)
        return U_all[:W], E_all[:W], E_all[W]

    def shadow_step(self, u: torch.Tensor, e: torch.Tensor, p: torch.Tensor,
                    previous: Optional[tuple] = None) -> torch.Tensor:
        """The serial sampler's step p from u with ē = e (both [B, ...]; p a one-element
        int64 tensor on the device): what ``serial`` runs, so the shadow is the serial
        sampler's state bit for bit when the model's output does not depend on the batch
        it runs in. The fused round's arithmetic for one step (its first step, whose
        input is exact, is this arithmetic: parallel == serial). An order-2 chain needs
        ``previous`` = (the input of step p-1, its ē), anything finite at p = 0."""
        c = self.coeffs
        if self.spec is None:
            R = None if c.R is None else c.R.index_select(0, p)[0]
            pair = None if self.order == 1 else (
                self._C.index_select(0, p)[0], self._D.index_select(0, p)[0], *previous)
            P, increment = self._step_P()
            return affine_step(P.index_select(0, p)[0], c.Q.index_select(0, p)[0], e, R, u,
                               increment, pair)
        noise = c.noise.index_select(0, p) if (self.spec.uses_noise and c.noise is not None) else None
        return fused_round(self.spec.sampler, self._table.index_select(0, p), e[None], u[None], u,
                           self._ones[:1], self._s, self._ybar(), noise, None)[0][0]

    def inputs(self, X: torch.Tensor, lo: int, hi: int,
               extra: Optional[torch.Tensor] = None) -> torch.Tensor:
        """U [hi-lo, B, ...]: the state entering each of steps lo..hi-1 (and ``extra``
        [B, ...] as one more row at the end, in the same buffer)."""
        rows = [self.carry(X, lo).unsqueeze(0)] + ([X[lo:hi - 1]] if hi - lo > 1 else [])
        if extra is not None:
            rows.append(extra.unsqueeze(0))
        if self.order == 2 and lo > 0:
            # the state entering step lo - 1, for the order-2 term of step lo: after the
            # rows returned, in the same buffer, so the model call takes it along
            rows.append(self.carry(X, lo - 1).unsqueeze(0))
            buffer = torch.cat(rows)
            self._pending = (lo, buffer)
            return buffer[:-1]
        return torch.cat(rows) if len(rows) > 1 else rows[0]

    def model_term(self, U: torch.Tensor, lo: int) -> torch.Tensor:
        """ē(U): the one batched model call of a round (finiteness is checked by the
        solver through the residuals it reads back anyway)."""
        return self._call(U, lo, None)

    def _call(self, U: torch.Tensor, lo: int, steps: Optional[torch.Tensor]) -> torch.Tensor:
        """``eps_bar(U, lo, steps)``; for an order-2 chain's window from lo > 0 the call
        also takes the row ``inputs`` put after U and records (lo, u_{lo-1}, ē_{lo-1})."""
        if self.order == 1:
            return self.eps_bar(U, lo, check_finite=False, steps=steps)
        pending, self._pending = self._pending, None
        if lo == 0:
            self._previous = (0, None, None)
            return self.eps_bar(U, lo, check_finite=False, steps=steps)
        if pending is None or pending[0] != lo or pending[1].data_ptr() != U.data_ptr():
            raise RuntimeError("an order-2 chain's model call takes the inputs that "
                               "ChainSystem.inputs returned for the same window")
        buffer = pending[1]
        if steps is None:
            steps = self._step_ids[lo:lo + U.shape[0]]
        E_all = self.eps_bar(buffer, lo, check_finite=False,
                             steps=torch.cat([steps, self._step_ids[lo - 1:lo]]))
        # copies: views would keep the round's whole input buffer and model output alive
        self._previous = (lo, buffer[-1].clone(), E_all[-1].clone())
        self.previous_rows += 1
        return E_all[:-1]

    def _previous_pair(self, E: torch.Tensor, U: torch.Tensor, lo: int,
                       previous: Optional[tuple]) -> Optional[tuple]:
        """(C, D, u_{lo-1}, ē_{lo-1}) of an order-2 chain's window from lo, for the
        scan (``affine_scan_reference``'s ``previous``); the pair from ``previous`` or else
        the window's model call. None for order 1."""
        if self.order == 1:
            return None
        if previous is None:
            if lo == 0:
                previous = (torch.zeros_like(U[0]), torch.zeros_like(E[0]))   # C_0 = D_0 = 0
            elif self._previous is None or self._previous[0] != lo:
                raise RuntimeError("an order-2 chain's scan from lo > 0 needs the model "
                                   "call of the same window (or previous=)")
            else:
                previous = self._previous[1:]
        hi = lo + E.shape[0]
        return (self._C[lo:hi], self._D[lo:hi], *previous)

    def _step_P(self):
        """(the P the step multiplies by, whether it is P - 1: ``Chain.increment_form``)."""
        Pm1 = self.coeffs.P_minus_one
        return (self.coeffs.P, False) if Pm1 is None else (Pm1, True)

    def _ybar(self) -> Optional[torch.Tensor]:
        return self.coeffs.ybar if self.spec.uses_y else None

    def _noise(self, lo: int, hi: int) -> Optional[torch.Tensor]:
        noise = self.coeffs.noise
        return noise[lo:hi] if (self.spec.uses_noise and noise is not None) else None

    def _fused(self, E, U, x_last, lo, hi, slopes, scale):
        return fused_round(self.spec.sampler, self._table[lo:hi], E, U, x_last, scale, self._s,
                           self._ybar(), self._noise(lo, hi), slopes)

    def scan(self, E: torch.Tensor, U: torch.Tensor, lo: int, hi: int,
             J: Optional[torch.Tensor] = None, previous: Optional[tuple] = None) -> torch.Tensor:
        """The states after steps lo..hi-1 from the carry U[0], with ē lagged at U and
        (with J, any tensor broadcastable to the window) linearised around it. An order-2
        chain's step also reads the previous step's input and linearised ē as the scan
        runs them (``affine_scan_reference``'s ``previous``)."""
        c = self.coeffs
        if self.spec is None:
            R = None if c.R is None else c.R[lo:hi]
            P, increment = self._step_P()
            return affine_scan(P[lo:hi], c.Q[lo:hi], E, R, U[0], J, None if J is None else U,
                               self._previous_pair(E, U, lo, previous), increment)
        if J is None:
            return self._fused(E, U, U[-1], lo, hi, None, self._ones[lo:hi])[0]
        # A J that is not a per-class slope table (ParaDiGMS' (1-P)/Q): the window's
        # coefficients in the state dtype, then the generic scan.
        P, Q, kY, kZ, _ = window_coefficients(self.spec.sampler, self._table[lo:hi].to(E.dtype),
                                              self._s, E.dim() - 2)
        ybar, noise = self._ybar(), self._noise(lo, hi)
        R = None if (kY is None or ybar is None) else kY * ybar.unsqueeze(0)
        if kZ is not None and noise is not None:
            R = kZ * noise if R is None else R + kZ * noise
        return affine_scan(P, Q, E, R, U[0], J, U)

    def previous_slopes(self, lin, a: int, b: int, like: torch.Tensor) -> torch.Tensor:
        """N_k = C_k + D_k J_{k-1} for steps k = a+1 .. b (0 past the last step), order 2:
        the slope of step k's previous term in the input of step k-1 (what a sharded
        solve's carry correction composes, ``distributed.ShardedEngine._order2_map``)."""
        J = lin.jacobian(a, b)                                   # J_a .. J_{b-1}
        C, D = (t[a:b] for t in self.next_previous_coefficients())
        return C if J is None else C + D * J

    def next_previous_coefficients(self):
        """(C_{k+1}, D_{k+1}) for k = 0..S-1, 0 for the last step (no step S): how an order-2
        step k+1 reads the input of step k and its ē (``previous_slopes``, the adjoint)."""
        zero = torch.zeros_like(self._C[:1])
        return torch.cat([self._C[1:], zero]), torch.cat([self._D[1:], zero])

    def step_slopes(self, lin, a: int, b: int, like: torch.Tensor) -> torch.Tensor:
        """M_i = P_i + Q_i J_i for steps a..b-1, broadcastable to [b-a, B, ...]: the slope of
        each step's linearised update in its input (what a sharded solve's carry
        correction composes, ``distributed.ShardedEngine``)."""
        J = lin.jacobian(a, b)
        if self.spec is not None:
            P, Q, _, _, _ = window_coefficients(self.spec.sampler, self._table[a:b].to(like.dtype),
                                                self._s, like.dim() - 2)
        else:
            P, Q = self.coeffs.P[a:b], self.coeffs.Q[a:b]
        return P if J is None else P + Q * J

    def extend(self, X: torch.Tensor, e: torch.Tensor, hi: int, new_hi: int) -> Optional[torch.Tensor]:
        """Start values of steps hi..new_hi-1 entering a sliding window: the scan from
        X[hi-1] with ē held at ``e`` [1, B, ...], the window's last model output (for
        DDIM η = 0, the jump along the current trajectory to each step's noise level).
        None for a chain that draws noise (η > 0): there the held ē started the steps
        no better than a copy of X[hi-1] (docs/design.md §3c, RESULTS §8 "Sliding
        windows"), and the solver copies."""
        if self.chain.needs_noise:
            return None
        n = new_hi - hi
        E = e.expand(n, *e.shape[1:]).contiguous()
        U = X[hi - 1:hi].expand(n, *X.shape[1:]).contiguous()
        # an order-2 chain: e is ē at the input of step hi - 1
        previous = (self.carry(X, hi - 1), e[0]) if self.order == 2 else None
        return self.scan(E, U, hi, new_hi, previous=previous)

    def round_and_residuals(self, E: torch.Tensor, U: torch.Tensor, x_last: torch.Tensor,
                            lo: int, hi: int, lin, scale: torch.Tensor):
        """One solver round after the model call: (F(X) for steps lo..hi-1, the per-step
        residual max|F(X)_i - X_i| * scale_i as a [hi-lo] float64 tensor on the state's
        device). X_i is U[i+1] for i < hi-lo-1 and ``x_last`` (= X[hi-1]) for the last
        step. With a kernel spec and a per-class slope table (or no J) this is one fused
        op (``ops/fused_round.py``); otherwise the scan, then the residuals."""
        table_J = not lin.active or getattr(lin, "fixed", None) is None
        w = getattr(self, "_derived_weight", None)
        if self.spec is not None and table_J and hasattr(lin, "slope_table"):
            FX, r = self._fused(E, U, x_last, lo, hi, lin.slope_table(lo, hi), scale)
            if w is None:
                return FX, r
        else:
            FX = self.scan(E, U, lo, hi, lin.jacobian(lo, hi))
        # the residual again, weighted (DDNM), or not fused: one more pass over F(X) and X
        if w is None:
            r = torch.cat([step_residuals(FX[:-1] - U[1:]), step_residuals(FX[-1:] - x_last[None])])
        else:
            r = torch.cat([self._weighted_max(FX[:-1], U[1:], lo, hi - 1, w),
                           self._weighted_max(FX[-1:], x_last[None], hi - 1, hi, w)])
        return FX, r.to(torch.float64) * scale

    def evaluate(self, X: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """F(X)[lo:hi] with ē lagged whole (J = 0): the plain fixed-point map."""
        U = self.inputs(X, lo, hi)
        return self.scan(self.model_term(U, lo), U, lo, hi)

    def linearization(self, kind: str) -> Linearization:
        return Linearization(self.chain, self.coeffs, kind)

    def jump_init(self) -> torch.Tensor:
        """Every state set to the one-step DDIM jump from the initial state to its noise
        level: x_i = sqrt(a'_i) x̂0 + sqrt(1 - a'_i) ε̂ with (x̂0, ε̂) the model's
        prediction at step 0 (one model call on B images)."""
        c = self.coeffs
        e = self.eps_bar(c.u0.unsqueeze(0), 0)[0]
        a0 = self.chain.alpha[0].item()
        return self._jump((c.u0 - (1 - a0) ** 0.5 * e) / a0 ** 0.5, e)

    def _jump(self, x0: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """[S, ...]: x_i = sqrt(a'_i) x0 + sqrt(1 - a'_i) e for every step."""
        an = self.chain.alpha_next.to(x0).view(-1, *([1] * x0.dim()))
        return an.sqrt() * x0 + (1 - an).sqrt() * e

    def pinv_init(self) -> torch.Tensor:
        """The jump of ``jump_init`` with x̂0 taken from the measurement instead of the
        model: x̂0 = ȳ/s = A⁺y on the spectral elements y sees with less than unit noise
        gain (s > σ_y), 0 elsewhere; ε̂ is still the model's at the initial state (one
        model call). The model's own x̂0 at t = T divides its error by sqrt(ᾱ_T) (~0.006
        for linear betas): x0 starts 20-33 off the serial image, A⁺y 1-2 off, and the
        restoration chains then need 2-4 fewer rounds (bench/RESULTS.md §8)."""
        c, chain = self.coeffs, self.chain
        if chain.operator is None or c.ybar is None:
            raise ValueError("init='pinv' needs a restoration chain (DDRM or DDNM)")
        e = self.eps_bar(c.u0.unsqueeze(0), 0)[0]
        s = chain.operator.singulars_as(c.u0)
        seen = s > getattr(chain, "sigma_y", 0.0)
        ybar = c.ybar.to(c.u0)
        x0 = torch.where(seen, ybar / torch.where(seen, s, torch.ones_like(s)), torch.zeros_like(ybar))
        return self._jump(x0, e)

    def serial(self, callback: Optional[Callable] = None, start: int = 0,
               stop: Optional[int] = None, states: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The reference serial sampler: one model call a step. Steps ``start``..``stop``-1
        (default all) from the state entering ``start`` (``states[start - 1]``), written
        into ``states`` (default a new [S, B, ...] tensor), which is returned."""
        c = self.coeffs
        stop = self.num_steps if stop is None else stop
        if states is None:
            states = torch.empty((self.num_steps, *c.u0.shape), dtype=c.u0.dtype,
                                 device=c.u0.device)
        u = self.carry(states, start)
        previous = None
        if self.order == 2:       # the input of step start - 1 and its ē (one more call)
            if start > 0:
                u_prev = self.carry(states, start - 1)
                previous = (u_prev, self.eps_bar(u_prev.unsqueeze(0), start - 1)[0])
                self.previous_rows += 1
            else:                 # C_0 = D_0 = 0
                previous = (torch.zeros_like(u), torch.zeros_like(u))
        for i in range(start, stop):
            e = self.eps_bar(u.unsqueeze(0), i)[0]
            # the fused round's arithmetic, one step (parallel == serial), and the serial
            # shadow's own code path (docs/design.md §3d)
            u_next = self.shadow_step(u, e, self._step_ids[i:i + 1], previous)
            if self.order == 2:
                previous = (u, e)
            u = u_next
            states[i] = u
            if callback is not None:
                callback({"step": i, "t": int(self.chain.timesteps[i]), "num_steps": self.num_steps})
        return states
