"""The fused solver round (docs/design.md §3a, §5): one op that rebuilds a window's
states with the linearised scan and measures the per-step residual in the same pass.

    u_{i+1} = P_i u_i + Q_i (E_i + J_i (u_i - U_i)) + R_i,   u_0 = U_0,
    r_i     = max |u_{i+1} - X_old_i| * scale_i,          X_old_i = U_{i+1} (i < W-1), x_last,

with P, Q, R computed from the chain's per-step scalars and each element's singular
value s, exactly as ``chains.py`` does (DDIM, DDRM, DDNM; ``KernelSpec``), instead of
being read from materialised [S, 1, C, H, W] coefficient tensors. R = kY ȳ + kZ z. J
comes as a slope table [W, B, K] (``linearize.py``): the class of each element is
computed from s and the step with the rules of ``chain.jacobian_classes``.

Layers (as in Liger-Kernel / flash-attention):
- ``step_table``: the per-step scalars, in float64, once per chain ([S, NS], tiny);
- ``element_coefficients`` / ``window_coefficients``: the per-element coefficients in
  the state dtype (no float64 per-pixel tensors);
- ``fused_round_reference``: the pure-PyTorch round, the ground truth of every test,
  differentiable (autograd runs through it when a graph is needed);
- ``fused_round``: validates its inputs (``ValueError``/``TypeError`` naming the
  argument), normalises layouts and dispatches to the backend chosen by
  ``backends.py`` (native C++/OpenMP or CUDA C++ from ``kernels/``, Triton, or the
  reference).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

# The sampler ids, NS and the columns of ``step_table`` (C_P0, C_Q0, ...; what each holds)
# are defined once in ``layout.py``, which the kernels also read (triton_round.py as
# constexprs, kernels/ through the header generated from it).
from .layout import (C_ETA, C_KEEP, C_KSNSY, C_KYA, C_P0, C_P2, C_PA, C_Q0, C_Q2,  # noqa: F401
                     C_QA, C_R, C_REB, C_RSY, C_SN, C_SN2, C_SY, C_SYEB, C_Z0, NS, NUM_CLASSES,
                     SAMPLERS)


@dataclass(frozen=True)
class KernelSpec:
    """What the fused round needs to know about a chain (``Chain.kernel_spec()``):
    the sampler, ᾱ before/after each step (float64, [S]), the sampler's parameters,
    the singular values (float64, broadcastable to one item; None for DDIM) and whether
    the step reads ȳ and the noise draw."""
    sampler: str
    alpha: torch.Tensor
    alpha_next: torch.Tensor
    eta: float = 0.0
    eta_b: float = 1.0
    sigma_y: float = 0.0
    singulars: Optional[torch.Tensor] = None
    uses_y: bool = False
    uses_noise: bool = False

    @property
    def sampler_id(self) -> int:
        return SAMPLERS[self.sampler]

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES[self.sampler]


def step_table(spec: KernelSpec) -> torch.Tensor:
    """[S, NS] float64: the per-step scalars of every step, computed once per chain with
    the float64 arithmetic of ``chains.py`` (DDIM._k, DDRM._k, DDNM._k). Only the parts
    that depend on the element's singular value are left to the kernels."""
    a = spec.alpha.to(torch.float64).cpu()
    an = spec.alpha_next.to(torch.float64).cpu()
    T = torch.zeros((a.numel(), NS), dtype=torch.float64)
    sa, sb = a.sqrt(), (1.0 - a).sqrt()
    eta, eta_b, sy = spec.eta, spec.eta_b, spec.sigma_y
    if spec.sampler == "ddim":
        # σ = η sqrt((1-a')/(1-a)) sqrt(1 - a/a');  x' = sqrt(a') x̂0 + sqrt(1-a'-σ²) ε + σ z
        sigma = eta * ((1 - an) / (1 - a)).sqrt() * (1 - a / an).clamp_min(0).sqrt()
        k0 = an.sqrt()
        kE = (1 - an - sigma ** 2).clamp_min(0).sqrt()
        T[:, C_P0] = k0 / sa
        T[:, C_Q0] = kE - k0 * sb / sa
        T[:, C_Z0] = sigma
        return T
    r = an.sqrt()
    if spec.sampler == "ddrm":
        sn = ((1 - an) / an).sqrt()                        # σ' (variance exploding)
        keep = (1 - eta ** 2) ** 0.5
        # class 0 (missing): x̄' = x̄0 + sqrt(1-η²) σ' ē + η σ' z, times r = sqrt(a')
        T[:, C_P0] = r / sa
        T[:, C_Q0] = r * (keep * sn) - r * sb / sa
        T[:, C_Z0] = r * (eta * sn)
        # class 2 (noisier than y): x̄' = (1-η_b) x̄0 + η_b ȳ/s + sqrt(σ'² - σ_y²η_b²/s²) z
        T[:, C_P2] = r * (1 - eta_b) / sa
        T[:, C_Q2] = 0 - r * (1 - eta_b) * sb / sa
        T[:, C_REB] = r * eta_b
        # class 1 (less noisy than y): x̄' = x̄0 + sqrt(1-η²) σ' (ȳ - s x̄0)/σ_y + η σ' z
        if sy > 0:
            T[:, C_KYA] = r * (keep * sn / sy)
            T[:, C_KSNSY] = keep * sn / sy
        T[:, C_PA] = r / sa
        T[:, C_QA] = r * sb / sa
        T[:, C_R] = r
        T[:, C_SN] = sn
        T[:, C_SN2] = sn ** 2
        T[:, C_SYEB] = sy * eta_b
        T[:, C_SY] = sy
        return T
    if spec.sampler == "ddnm":
        sn = (1 - an).sqrt()                               # σ' (variance preserving)
        keep = (1 - eta ** 2) ** 0.5
        # null space (λ = 0, γ = σ'): x' = sqrt(a') x̄0 + σ' (η z + sqrt(1-η²) ē)
        T[:, C_P0] = r / sa
        T[:, C_Q0] = sn * keep - r * sb / sa
        T[:, C_Z0] = sn * eta
        T[:, C_KEEP] = keep
        T[:, C_ETA] = eta
        T[:, C_PA] = r / sa
        T[:, C_QA] = r * sb / sa
        T[:, C_R] = r
        T[:, C_SN] = sn
        T[:, C_SN2] = sn ** 2
        T[:, C_RSY] = r * sy
        return T
    raise ValueError(f"unknown sampler {spec.sampler!r}")


def element_coefficients(sampler: str, col, s: Optional[torch.Tensor]):
    """P, Q, kY, kZ (kY None for DDIM) and the Jacobian class of each element, in the
    state dtype. ``col(c)``: column c of the step table as a tensor broadcastable against
    ``s`` (the singular values, state dtype). The kernels transcribe this function."""
    if sampler == "ddim":
        return col(C_P0), col(C_Q0), None, col(C_Z0), None
    pos = s > 0
    inv_s = torch.where(pos, 1.0 / torch.where(pos, s, torch.ones_like(s)), torch.zeros_like(s))
    if sampler == "ddrm":
        sn, sy = col(C_SN), col(C_SY)
        before = pos & (s * sn > sy)                       # noisier than y: class 2
        after = pos & (s * sn < sy)                        # less noisy than y: class 1
        c0a = 1 - col(C_KSNSY) * s                         # class 1: 1 - sqrt(1-η²)σ' s/σ_y
        P = torch.where(before, col(C_P2), torch.where(after, col(C_PA) * c0a, col(C_P0)))
        Q = torch.where(before, col(C_Q2), torch.where(after, -(col(C_QA) * c0a), col(C_Q0)))
        kY = torch.where(before, col(C_REB) * inv_s,
                         torch.where(after, col(C_KYA), torch.zeros_like(P)))
        spread = (col(C_SN2) - (col(C_SYEB) * inv_s) ** 2).clamp_min(0).sqrt()
        kZ = torch.where(before, col(C_R) * spread, col(C_Z0))
        cls = after.to(torch.int8) + 2 * before.to(torch.int8)
        return P, Q, kY, kZ, cls
    if sampler == "ddnm":
        sn = col(C_SN)
        y_noise = col(C_RSY) * inv_s                       # noise std of sqrt(a') A⁺y
        full = pos & (sn >= y_noise)                       # λ = 1: class 1
        part = pos & ~full                                 # λ < 1 (DDNM+): class 2
        rsy = col(C_RSY)
        lam = (sn * s) / torch.where(rsy != 0, rsy, torch.ones_like(rsy))
        gamma = (col(C_SN2) - y_noise ** 2).clamp_min(0).sqrt()
        c0 = 1 - lam
        P = torch.where(full, torch.zeros_like(c0), torch.where(part, col(C_PA) * c0, col(C_P0)))
        Q = torch.where(full, gamma * col(C_KEEP), torch.where(part, -(col(C_QA) * c0), col(C_Q0)))
        kY = torch.where(full, col(C_R) * inv_s,
                         torch.where(part, (col(C_R) * lam) * inv_s, torch.zeros_like(P)))
        kZ = torch.where(full, gamma * col(C_ETA), torch.where(part, torch.zeros_like(P), col(C_Z0)))
        cls = full.to(torch.int8) + 2 * part.to(torch.int8)
        return P, Q, kY, kZ, cls
    raise ValueError(f"unknown sampler {sampler!r}")


def window_coefficients(sampler: str, table: torch.Tensor, s: Optional[torch.Tensor],
                        item_dim: int):
    """``element_coefficients`` for the steps of ``table`` ([W, NS], any dtype/device:
    cast here to ``s``'s or the table's dtype): tensors [W, 1, *s.shape] (or [W, 1, 1...]
    for DDIM), ready to broadcast over [W, B, *item]."""
    W = table.shape[0]
    view = (W, 1) + (1,) * item_dim

    def col(c):
        return table[:, c].reshape(view)

    return element_coefficients(sampler, col, None if s is None else s.unsqueeze(0))


def fused_round_reference(sampler: str, table: torch.Tensor, E: torch.Tensor, U: torch.Tensor,
                          x_last: torch.Tensor, scale: torch.Tensor,
                          s: Optional[torch.Tensor] = None, ybar: Optional[torch.Tensor] = None,
                          noise: Optional[torch.Tensor] = None,
                          slopes: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused round in plain PyTorch, one step at a time (coefficients per step in the
    state dtype; nothing of size [W, ...] besides the output).

    table: [W, NS] step scalars (``step_table`` rows of the window; cast to E's dtype);
    E, U: [W, B, *item]; x_last: [B, *item] (the old state after the window's last step);
    scale: [W] float64; s: singular values broadcastable to [*item] (None for DDIM);
    ybar: [1 or B, *item] or None; noise: [W, B, *item] or None; slopes: [W, 1 or B, K]
    or None. Returns (states [W, B, *item], residuals [W] float64)."""
    W, B = E.shape[:2]
    item_dim = E.dim() - 2
    table = table.to(device=E.device, dtype=E.dtype)
    s_ = None if s is None else s.to(E).unsqueeze(0)               # [1, *item]
    pad = (1,) * item_dim
    out = torch.empty_like(E)
    res = torch.empty(W, dtype=torch.float64, device=E.device)
    u = U[0]
    for i in range(W):
        def col(c, i=i):
            return table[i, c].reshape((1,) + pad)

        P, Q, kY, kZ, cls = element_coefficients(sampler, col, s_)
        e = E[i]
        if slopes is not None:
            sl = slopes[i].to(E)                                         # [1 or B, K]
            if cls is None or sl.shape[-1] == 1:
                j = sl[:, 0].reshape(-1, *pad)
            else:                                    # the slope of each element's class
                j = sl[:, cls[0].long()]                                 # [1 or B, *s dims]
            e = e + j * (u - U[i])
        u = P * u + Q * e
        R = None
        if kY is not None and ybar is not None:
            R = kY * ybar
        if kZ is not None and noise is not None:
            R = kZ * noise[i] if R is None else R + kZ * noise[i]
        if R is not None:
            u = u + R
        out[i] = u
        old = U[i + 1] if i + 1 < W else x_last
        res[i] = (u - old).abs().amax().to(torch.float64) * scale[i]
    return out, res


# -- launcher ---------------------------------------------------------------------------
KERNEL_DTYPES = (torch.float32, torch.float64)


def _tensor(name: str, t, *, optional: bool = False) -> Optional[torch.Tensor]:
    if t is None and optional:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor{' or None' if optional else ''}, "
                        f"got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    return t


def check_round_inputs(sampler, table, E, U, x_last, scale, s, ybar, noise, slopes) -> None:
    """Raise ValueError / TypeError naming the first bad argument of ``fused_round``."""
    if not isinstance(sampler, str):
        raise TypeError(f"sampler must be a str, got {type(sampler).__name__}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}, got {sampler!r}")
    E = _tensor("E", E)
    if E.dim() < 3:
        raise ValueError(f"E must be [W, B, *item], got shape {tuple(E.shape)}")
    W, B, item = E.shape[0], E.shape[1], tuple(E.shape[2:])
    if W < 1 or B < 1 or E.numel() == 0:
        raise ValueError(f"E must be non-empty, got shape {tuple(E.shape)}")
    for name, t, shape in (("U", U, tuple(E.shape)), ("x_last", x_last, (B, *item))):
        t = _tensor(name, t)
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} must have shape {shape}, got {tuple(t.shape)}")
    table = _tensor("table", table)
    if tuple(table.shape) != (W, NS):
        raise ValueError(f"table must be [W, {NS}] = ({W}, {NS}) (step_table rows), got {tuple(table.shape)}")
    scale = _tensor("scale", scale)
    if tuple(scale.shape) != (W,):
        raise ValueError(f"scale must have shape ({W},), got {tuple(scale.shape)}")
    s = _tensor("s", s, optional=True)
    if sampler == "ddim":
        if s is not None or ybar is not None:
            raise ValueError("DDIM reads no singular values (s) or measurement (ybar): pass None")
    else:
        if s is None:
            raise ValueError(f"s (the singular values) is required for {sampler}")
        try:
            ok = torch.broadcast_shapes(tuple(s.shape), item) == item
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(f"s must broadcast to one item {item}, got {tuple(s.shape)}")
    ybar = _tensor("ybar", ybar, optional=True)
    if ybar is not None and (ybar.dim() != E.dim() - 1 or ybar.shape[0] not in (1, B)
                             or tuple(ybar.shape[1:]) != item):
        raise ValueError(f"ybar must have shape [1 or {B}, *{item}], got {tuple(ybar.shape)}")
    noise = _tensor("noise", noise, optional=True)
    if noise is not None and tuple(noise.shape) != tuple(E.shape):
        raise ValueError(f"noise must have E's shape {tuple(E.shape)}, got {tuple(noise.shape)}")
    slopes = _tensor("slopes", slopes, optional=True)
    if slopes is not None and (slopes.dim() != 3 or slopes.shape[0] != W
                               or slopes.shape[1] not in (1, B)
                               or slopes.shape[2] not in (1, NUM_CLASSES[sampler])):
        raise ValueError(f"slopes must be [W={W}, 1 or {B}, 1 or {NUM_CLASSES[sampler]}] "
                         f"(one slope per step, item and class), got {tuple(slopes.shape)}")
    for name, t in (("U", U), ("x_last", x_last), ("ybar", ybar), ("noise", noise)):
        if t is not None and t.dtype != E.dtype:
            raise TypeError(f"{name} must have E's dtype {E.dtype}, got {t.dtype}")
    for name, t in (("U", U), ("x_last", x_last), ("table", table), ("scale", scale), ("s", s),
                    ("ybar", ybar), ("noise", noise), ("slopes", slopes)):
        if t is not None and t.device != E.device:
            raise ValueError(f"{name} is on {t.device} but E is on {E.device}")


def _normalise(sampler, table, E, U, x_last, scale, s, ybar, noise, slopes):
    """The kernels' layout: [W, B, n] / [B, n] / [n] contiguous in E's dtype, float64
    table and scale; broadcast ȳ keeps batch 1 (read with batch stride 0)."""
    W, B = E.shape[:2]
    item = tuple(E.shape[2:])
    n = E[0, 0].numel()
    dt = E.dtype
    flat = lambda t, *shape: None if t is None else t.to(dt).reshape(*shape).contiguous()  # noqa: E731
    return (SAMPLERS[sampler],
            table.to(torch.float64).contiguous(),
            flat(E, W, B, n), flat(U, W, B, n), flat(x_last, B, n),
            scale.to(torch.float64).contiguous(),
            None if sampler == "ddim" else s.to(dt).expand(item).reshape(n).contiguous(),
            None if (ybar is None or sampler == "ddim") else flat(ybar, ybar.shape[0], n),
            flat(noise, W, B, n),
            None if slopes is None else slopes.to(dt).contiguous())


def _close(out, res, ref_out, ref_res, scale) -> Tuple[bool, str]:
    """A loose check for gross kernel faults (a wrong layout, flag or build), run once per
    process and configuration: rounding differences (even FMA contraction over 1000
    float32 steps) stay orders of magnitude below these bounds. Non-finite values must
    sit in the same places."""
    tol = 1e-3 if out.dtype == torch.float32 else 1e-9
    fin = torch.isfinite(ref_out)
    if not torch.equal(torch.isfinite(out), fin) or not torch.equal(torch.isfinite(res),
                                                                    torch.isfinite(ref_res)):
        return False, "non-finite values differ"
    size = max(1.0, float(ref_out[fin].abs().max())) if bool(fin.any()) else 1.0
    err = float((out - ref_out)[fin].abs().max()) if bool(fin.any()) else 0.0
    rf = torch.isfinite(ref_res)
    rerr = float(((res - ref_res)[rf].abs() / scale.to(res)[rf]).max()) if bool(rf.any()) else 0.0
    ok = err <= tol * size and rerr <= 1.01 * tol * size
    return ok, f"max state error {err:.2e}, residual error {rerr:.2e} (bound {tol * size:.1e})"


def fused_round(sampler: str, table: torch.Tensor, E: torch.Tensor, U: torch.Tensor,
                x_last: torch.Tensor, scale: torch.Tensor, s: Optional[torch.Tensor] = None,
                ybar: Optional[torch.Tensor] = None, noise: Optional[torch.Tensor] = None,
                slopes: Optional[torch.Tensor] = None, *, backend: Optional[str] = None,
                check: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """One fused solver round (arguments as ``fused_round_reference``) on the backend
    ``backends.choose`` picks for E's device, or ``backend`` ('torch', 'native',
    'triton'). Returns (states shaped like E, residuals [W] float64 on E's device).
    The kernels have no backward: when autograd needs a graph, or for dtypes other than
    float32/float64, the reference runs. ``check=False`` skips input validation (the
    solver validated its buffers once)."""
    from . import backends
    if check:
        check_round_inputs(sampler, table, E, U, x_last, scale, s, ybar, noise, slopes)
    needs_graph = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (E, U, x_last, s, ybar, noise, slopes))
    chosen = backend is None           # only a backend chosen by auto is validated
    if chosen:
        backend = backends.choose(E.device)[0]
    elif backend not in ("torch", "native", "triton"):
        raise ValueError(f"backend must be 'torch', 'native' or 'triton', got {backend!r}")
    if needs_graph or E.dtype not in KERNEL_DTYPES:
        backend = "torch"
    if backend == "torch":
        return fused_round_reference(sampler, table, E, U, x_last, scale, s, ybar, noise, slopes)
    args = _normalise(sampler, table, E, U, x_last, scale, s, ybar, noise, slopes)
    if backend == "native":
        from .native import fused_round_native
        out, res = fused_round_native(*args)
    else:
        from .triton_round import fused_round_triton
        out, res = fused_round_triton(*args)
    out = out.view(E.shape)
    # Validated per (device, sampler, dtype, inputs): on a one-step call (the serial
    # sampler's) and again on the first window of several steps. A one-step window never
    # reads step i+1's inputs, so a kernel indexing them wrongly passes it (seen in
    # mutation testing: a C++ kernel reading the next step's noise).
    # The key also names which optional inputs the call reads (noise, J, ȳ and whether
    # ȳ is per item): a kernel wrong only on one of those paths must meet a check there.
    y_kind = "-" if ybar is None else ("per-item" if ybar.shape[0] > 1 else "shared")
    vkey = (f"{sampler}/{'window' if E.shape[0] > 1 else 'step'}"
            f"/noise{int(noise is not None)}/J{int(slopes is not None)}/ybar-{y_kind}")
    if chosen and backends.needs_validation(backend, E.device, vkey, E.dtype):
        ref_out, ref_res = fused_round_reference(sampler, table, E, U, x_last, scale, s, ybar,
                                                 noise, slopes)
        ok, detail = _close(out, res, ref_out, ref_res, scale)
        backends.record_validation(backend, E.device, vkey, E.dtype, ok, detail)
        if not ok:
            return ref_out, ref_res
    return out, res
