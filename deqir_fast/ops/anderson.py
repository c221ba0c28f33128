"""Anderson mixing over the stacked chain, with one set of weights per (step, batch item).

For history entries j = 1..m with iterates X_j and residuals G_j = F(X_j) - X_j, the
weights α minimise ||Σ_j α_j G_j||² subject to Σ_j α_j = 1 (Walker & Ni 2011):
α = H⁻¹1 / 1ᵀH⁻¹1 with H the regularised Gram matrix, and the new iterate is
Σ_j α_j (X_j + d G_j) (d the damping). With ``prefix=True`` the Gram matrix of step s sums those of
steps lo..s (the triangular variant: a step's weights also see the residuals of the
steps that feed it).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch


def anderson_mix(X_hist: Sequence[torch.Tensor], G_hist: Sequence[torch.Tensor],
                 valid: torch.Tensor, *, reg: float = 1e-4, damping: float = 1.0,
                 prefix: bool = False) -> torch.Tensor:
    """Mix the history (oldest first; the last entry is the newest).

    X_hist[j], G_hist[j]: [W, B, ...] over the active window; ``valid``: [m, W] bool,
    False where entry j had not evaluated step s (its weight is forced to 0). The
    Gram matrices and solves run in float64. A non-finite or failed solve falls back
    to the newest entry with plain damping (a Picard step) for that (step, item).
    """
    m = len(G_hist)
    if m == 1:
        return X_hist[0] + damping * G_hist[0]
    G = torch.stack([g.flatten(2) for g in G_hist])              # [m, W, B, n]
    G64 = G.to(torch.float64)
    H = torch.einsum("jwbn,kwbn->wbjk", G64, G64)              # [W, B, m, m]
    alpha = anderson_weights(H, valid, reg=reg, prefix=prefix).to(G.dtype)   # [W, B, m]
    Xs = torch.stack([x.flatten(2) for x in X_hist])           # [m, W, B, n]
    mixed = torch.einsum("wbj,jwbn->wbn", alpha, Xs + damping * G)
    return mixed.view_as(X_hist[-1])


def anderson_weights(H: torch.Tensor, valid: torch.Tensor, *, reg: float = 1e-4,
                     prefix: bool = False) -> torch.Tensor:
    """The mixing weights [W, B, m] (float64) from the Gram matrices H [W, B, m, m] of the
    history (entries oldest first; H's entries for pairs with an excluded entry are 0)
    and ``valid`` [m, W]: the prefix sum over steps (triangular variant), the
    regularised bordered solves, and the Picard fallback. Shared by ``anderson_mix`` and
    ``AndersonRing`` so both run the same maths."""
    if prefix:
        H = H.cumsum(0)
    v = valid.to(torch.float64).transpose(0, 1)[:, None, :]    # [W, 1, m]
    H = H * v[..., :, None] * v[..., None, :]
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    scale = diag.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    # Regularise relative to the largest residual norm, and pin excluded entries
    # with a huge diagonal so their weights vanish.
    H = H + torch.diag_embed(reg * scale + (1.0 - v) * 1e12 * scale)
    ones = torch.ones(H.shape[:-1] + (1,), dtype=H.dtype, device=H.device)
    sol, info = torch.linalg.solve_ex(H, ones)
    alpha = sol.squeeze(-1)
    alpha = alpha / alpha.sum(-1, keepdim=True)
    ok = (info == 0)[..., None] & torch.isfinite(alpha).all(-1, keepdim=True)
    newest = torch.zeros_like(alpha)
    newest[..., -1] = 1.0
    return torch.where(ok, alpha, newest)


def ring_segments(lo: int, hi: int, rows: int):
    """(window offset, row start, length) pieces of steps lo..hi-1 in a ring of ``rows``
    rows indexed by step % rows."""
    out, w = [], 0
    while lo + w < hi:
        r = (lo + w) % rows
        n = min(hi - lo - w, rows - r)
        out.append((w, r, n))
        w += n
    return out


# float64 products of a history entry with the newest one are formed this many values at
# a time, so the Gram update never holds more than ~16 MB of float64 temporaries.
_GRAM_CHUNK = 1 << 20


class AndersonRing:
    """Anderson history in preallocated buffers: the last ``m`` iterates X_j and
    residuals G_j of every step, [m, rows, B, ...] (row = step % rows, so a sliding
    window of at most ``rows`` steps never collides), and the Gram matrices of every pair
    of entries, [rows, B, m, m] float64, kept up to date: a new entry costs one pass
    over the entries it is dotted with, not a re-stacked history and a full m x m
    einsum per round. ``mix`` gives what ``anderson_mix`` gives on the same history
    (same weights function; rounding aside).

    Which entry saw which step is host bookkeeping (``step_of``): an entry is excluded
    for a step it did not evaluate, as in ``anderson_mix``'s ``valid``."""

    def __init__(self, m: int, rows: int, like: torch.Tensor):
        if m < 1 or rows < 1:
            raise ValueError(f"AndersonRing needs m >= 1 and rows >= 1, got {m}, {rows}")
        self.m, self.rows = m, rows
        self.item_shape = tuple(like.shape)           # one step's state: [B, ...]
        B = like.shape[0]
        self.X = like.new_zeros((m, rows, *like.shape))
        self.G = like.new_zeros((m, rows, *like.shape))
        self.gram = torch.zeros((rows, B, m, m), dtype=torch.float64, device=like.device)
        self.step_of = torch.full((m, rows), -1, dtype=torch.int64)   # host
        self.count = 0
        self.native = _native_for(like, m)

    def forget(self) -> None:
        self.step_of.fill_(-1)
        self.count = 0

    def skip(self) -> None:
        """Advance the history without an entry: a rank of a sharded solve with no steps
        this round keeps the slot count of its peers, so every rank agrees on which slot
        is which round's entry."""
        self.count += 1

    def export_rows(self, s0: int, s1: int):
        """The history of steps s0..s1-1 (their rows of every entry, Gram rows and which
        entry saw them), for a step moving to another rank's ring of the same shape."""
        rws = torch.arange(s0, s1) % self.rows
        rd = rws.to(self.gram.device)
        return [self.X[:, rd], self.G[:, rd], self.gram[rd],
                self.step_of[:, rws].to(torch.float64).to(self.gram.device)]

    def import_rows(self, s0: int, s1: int, tensors) -> None:
        """``export_rows``'s tensors of steps s0..s1-1 into this ring's rows."""
        rws = torch.arange(s0, s1) % self.rows
        rd = rws.to(self.gram.device)
        self.X[:, rd] = tensors[0]
        self.G[:, rd] = tensors[1]
        self.gram[rd] = tensors[2]
        self.step_of[:, rws] = tensors[3].to("cpu").to(torch.int64)

    def held(self):
        """Slots of the entries held, oldest first."""
        h = min(self.count, self.m)
        return [(self.count - h + i) % self.m for i in range(h)]

    def _segments(self, lo: int, hi: int):
        return ring_segments(lo, hi, self.rows)

    def valid(self, lo: int, hi: int, slots) -> torch.Tensor:
        steps = torch.arange(lo, hi)
        return torch.stack([self.step_of[j, steps % self.rows] == steps for j in slots])

    def push(self, lo: int, hi: int, X: torch.Tensor, G: Optional[torch.Tensor] = None,
             FX: Optional[torch.Tensor] = None) -> None:
        """Record the window's iterate X and residual G ([hi-lo, B, ...]) as the newest
        entry, and its Gram row against every held entry. With ``FX`` instead of G, G =
        FX - X is written straight into the ring (no temporary)."""
        if (G is None) == (FX is None):
            raise ValueError("push takes G or FX")
        if hi - lo > self.rows:
            raise ValueError(f"a window of {hi - lo} steps does not fit {self.rows} rows")
        p = self.count % self.m
        self.count += 1
        for w, r, n in self._segments(lo, hi):
            self.X[p, r:r + n].copy_(X[w:w + n])
            if G is not None:
                self.G[p, r:r + n].copy_(G[w:w + n])
            else:
                torch.sub(FX[w:w + n], X[w:w + n], out=self.G[p, r:r + n])
        self.step_of[p, torch.arange(lo, hi) % self.rows] = torch.arange(lo, hi)
        if self.native:             # one pass over each entry's rows, float64 sums in-kernel
            held = self.held()
            idx = torch.tensor(held, device=self.gram.device)
            for _, r, n in self._segments(lo, hi):
                dots = torch.ops.deqir_fast.anderson_gram(self.G.flatten(3), p, held, r, r + n)
                self.gram[r:r + n, :, p, idx] = dots
                self.gram[r:r + n, :, idx, p] = dots
            return
        per_row = max(1, _GRAM_CHUNK // max(1, X[0].numel()))
        for j in self.held():
            for _, r, n in self._segments(lo, hi):
                for c in range(r, r + n, per_row):
                    e = min(c + per_row, r + n)
                    a = self.G[p, c:e].flatten(2).to(torch.float64)
                    b = a if j == p else self.G[j, c:e].flatten(2).to(torch.float64)
                    dots = (a * b).sum(-1)                               # [rows, B]
                    self.gram[c:e, :, p, j] = dots
                    self.gram[c:e, :, j, p] = dots

    def mix(self, lo: int, hi: int, *, reg: float = 1e-4, damping: float = 1.0,
            prefix: bool = False, out: Optional[torch.Tensor] = None,
            offset: Optional[Callable] = None) -> torch.Tensor:
        """The mixed iterate of steps lo..hi-1, [hi-lo, *item]: Σ_j α_j (X_j + d G_j),
        written into ``out`` when given (e.g. the solver's own X[lo:hi]: the ring holds
        copies of the entries, so it may alias the newest iterate).

        ``offset`` (with ``prefix``; a block of a sharded window): a function of this
        block's summed masked Gram matrices [B, h, h] returning the sum over the window's
        steps before ``lo``, called exactly once (with None when there is no Gram to sum:
        it is a collective its peers wait in)."""
        slots = self.held()
        if not slots:
            raise RuntimeError("AndersonRing.mix before any push")
        W = hi - lo
        segs = self._segments(lo, hi)
        if out is None:
            out = self.X.new_empty((W, *self.item_shape))
        if len(slots) == 1:                       # one entry: a damped Picard step
            if prefix and offset is not None:
                offset(None)
            p = slots[0]
            for w, r, n in segs:
                torch.add(self.X[p, r:r + n], self.G[p, r:r + n], alpha=damping, out=out[w:w + n])
            return out
        H, valid, vd = self.masked_gram(lo, hi, slots, segs)
        if prefix and offset is not None:
            # cumsum from the exclusive prefix of the earlier blocks: the first row adds
            # the offset, then the block's own steps in order, as the single process does
            H = H.clone()
            H[0] += offset(H.sum(0))
            alpha = anderson_weights(H.cumsum(0), vd, reg=reg, prefix=False).to(self.X.dtype)
        else:
            alpha = anderson_weights(H, vd, reg=reg, prefix=prefix).to(self.X.dtype)   # [W, B, h]
        return self.apply_weights(alpha, valid, vd, slots, segs, damping, out)

    def masked_gram(self, lo: int, hi: int, slots, segs):
        """The [W, B, h, h] Gram matrices of the held entries over steps lo..hi-1, zero
        where an entry did not evaluate a step; with ``valid`` ([h, W], host) and its
        copy on the Gram's device."""
        idx = torch.tensor(slots, device=self.gram.device)
        rows = torch.cat([torch.arange(r, r + n) for _, r, n in segs]).to(self.gram.device)
        valid = self.valid(lo, hi, slots)                                # [h, W], host
        vd = valid.to(self.gram.device)
        both = (vd.transpose(0, 1)[:, None, :, None] & vd.transpose(0, 1)[:, None, None, :])
        # where, not a product: rows an entry did not evaluate may hold anything
        H = torch.where(both, self.gram[rows][:, :, idx][:, :, :, idx], 0.0)
        return H, valid, vd

    def apply_weights(self, alpha, valid, vd, slots, segs, damping: float,
                      out: torch.Tensor) -> torch.Tensor:
        """out = Σ_j α_j (X_j + d G_j) over the window's segments of the ring."""
        pad = (1,) * (len(self.item_shape) - 1)
        if self.native:
            # zero weights for excluded (entry, step) pairs: the kernel skips them
            alpha = torch.where(vd.transpose(0, 1)[:, None, :], alpha, 0).contiguous()
            for w, r, n in segs:
                dst = out[w:w + n]
                if dst.is_contiguous():
                    torch.ops.deqir_fast.anderson_mix_out(
                        self.X.flatten(3), self.G.flatten(3), slots, alpha[w:w + n].contiguous(), r,
                        r + n, float(damping), dst)
                else:
                    dst.copy_(torch.ops.deqir_fast.anderson_mix(
                        self.X.flatten(3), self.G.flatten(3), slots, alpha[w:w + n].contiguous(), r,
                        r + n, float(damping)).view_as(dst))
            return out
        out.zero_()
        for k, j in enumerate(slots):
            # An excluded entry contributes nothing (anderson_mix pads it with zeros):
            # accumulate entry j only over the window positions it evaluated.
            ok = valid[k]
            for w, r, n in segs:
                pos = ok[w:w + n]
                if not bool(pos.any()):
                    continue
                for a0, a1 in _runs(pos):
                    o = out[w + a0:w + a1]
                    a = alpha[w + a0:w + a1, :, k].reshape(a1 - a0, -1, *pad)
                    term = torch.add(self.X[j, r + a0:r + a1], self.G[j, r + a0:r + a1], alpha=damping)
                    o.addcmul_(term, a)
        return out


def _native_for(like: torch.Tensor, m: int = 1) -> bool:
    """Whether the ring runs the native Gram/mix kernels: when the fused round's backend
    for this device is 'native' and the library has them (CUDA: history <= 16)."""
    if like.dtype not in (torch.float32, torch.float64) or (like.is_cuda and m > 16):
        return False
    from . import backends
    try:
        if backends.choose(like.device)[0] != "native":
            return False
    except ValueError:
        return False
    return hasattr(torch.ops.deqir_fast, "anderson_mix") and \
        torch._C._dispatch_has_kernel_for_dispatch_key("deqir_fast::anderson_mix",
                                                        "CUDA" if like.is_cuda else "CPU")


def _runs(mask: torch.Tensor):
    """[start, end) of each run of True in a 1-D host bool tensor."""
    out, start = [], None
    for i, v in enumerate(mask.tolist()):
        if v and start is None:
            start = i
        elif not v and start is not None:
            out.append((start, i))
            start = None
    if start is not None:
        out.append((start, len(mask)))
    return out


class DifferenceRing:
    """Anderson history in a low-precision dtype (``solve(..., history_dtype=...)``), in
    the difference form (Walker & Ni 2011, §2): per (step, batch item)

        γ = argmin ||g_k - Σ_j γ_j ΔG_j||² (+ reg),   x_{k+1} = x_k + d g_k - Σ_j γ_j (ΔX_j + d ΔG_j),

    with ΔX_j = x_{j+1} - x_j, ΔG_j = g_{j+1} - g_j over the last m - 1 rounds. It gives
    the same iterates as the constrained form of ``AndersonRing`` (Σ α = 1) up to the
    regularisation; the point is what it stores. Differences and the previous residual
    shrink with the residual, so rounding them to bfloat16 perturbs each update by
    ~2⁻⁸ of its own size, not of the state: the solve still converges to the serial
    answer (the fixed point is F's alone). Held: m - 1 pairs (ΔX, ΔG) and g_{k-1}, i.e.
    (2m - 1) stacked states in ``dtype`` (3.5 float32 states for m = 4 in bfloat16,
    against 8 for ``AndersonRing``; bench/round.py --memory). Torch ops only (the
    native Gram/mix kernels read float32/float64 rings).

    Rows are indexed by absolute step (row = step % rows), as in ``AndersonRing``; an
    entry is used at step s only where both rounds it spans evaluated s."""

    def __init__(self, m: int, rows: int, like: torch.Tensor, dtype: torch.dtype):
        if m < 1 or rows < 1:
            raise ValueError(f"DifferenceRing needs m >= 1 and rows >= 1, got {m}, {rows}")
        self.m, self.rows = m, rows
        self.item_shape = tuple(like.shape)
        d = max(m - 1, 0)
        self.dX = torch.zeros((d, rows, *like.shape), dtype=dtype, device=like.device)
        self.dG = torch.zeros((d, rows, *like.shape), dtype=dtype, device=like.device)
        self.g_prev = torch.zeros((rows, *like.shape), dtype=dtype, device=like.device)
        # host bookkeeping: the steps [lo, hi) each pair is valid on; the previous round's
        # window (where g_prev and the pending ΔX are); pairs held, oldest first.
        self.span = [(0, 0)] * d
        self.order: list = []
        self.prev = None            # (lo, hi) of the last update, or None after forget()
        self.pending = None         # slot whose ΔX awaits its ΔG

    def forget(self) -> None:
        self.order, self.prev, self.pending = [], None, None

    def _rows(self, lo: int, hi: int):
        return ring_segments(lo, hi, self.rows)

    def update(self, lo: int, hi: int, X: torch.Tensor, FX: torch.Tensor, *, reg: float = 1e-4,
               damping: float = 1.0, prefix: bool = False) -> torch.Tensor:
        """The next iterate of steps lo..hi-1, written into X ([hi-lo, *item]) in place."""
        W = hi - lo
        if W > self.rows:
            raise ValueError(f"a window of {W} steps does not fit {self.rows} rows")
        segs = self._rows(lo, hi)
        g = torch.sub(FX, X)                                   # the round's one temporary
        d = self.dX.shape[0]
        # 1. the pending pair's ΔG = g_k - g_{k-1}, on the steps both rounds evaluated
        if d and self.pending is not None and self.prev is not None:
            plo, phi = self.prev
            a, b = max(lo, plo), min(hi, phi)
            if a < b:
                p = self.pending
                per_row = max(1, _GRAM_CHUNK // max(1, g[0].numel()))   # bounded temporaries
                for w, r, n in self._rows(a, b):
                    o = a - lo + w
                    for c in range(0, n, per_row):
                        e = min(c + per_row, n)
                        self.dG[p, r + c:r + e].copy_(g[o + c:o + e] - self.g_prev[r + c:r + e].to(g.dtype))
                self.span[p] = (a, b)
                self.order.append(p)
                if len(self.order) > d:
                    self.order.pop(0)
        for w, r, n in segs:
            self.g_prev[r:r + n].copy_(g[w:w + n])
        # 2. γ per (step, item) from the pairs valid there (float64 normal equations)
        held = list(self.order)
        if held:
            gamma = self._weights(lo, hi, segs, g, held, reg, prefix)      # [W, B, h] host-free
        # 3. the step x_{k+1} - x_k = d g - Σ γ_j (ΔX_j + d ΔG_j), built in g
        g.mul_(damping)
        if held:
            pad = (1,) * (len(self.item_shape) - 1)
            per_row = max(1, _GRAM_CHUNK // max(1, g[0].numel()))   # bounded temporaries
            for k, j in enumerate(held):
                # only the steps the pair is valid on: elsewhere γ is 0, and a stale row
                # (say a non-finite one from a round that was thrown away) must not leak
                # in as 0 · NaN
                a, b = max(lo, self.span[j][0]), min(hi, self.span[j][1])
                for w, r, n in (self._rows(a, b) if a < b else ()):
                    w += a - lo
                    for c in range(0, n, per_row):
                        e = min(c + per_row, n)
                        coef = gamma[w + c:w + e, :, k].to(g.dtype).reshape(e - c, -1, *pad)
                        term = self.dX[j, r + c:r + e].to(g.dtype, copy=True)   # not a view of the ring
                        term.add_(self.dG[j, r + c:r + e].to(g.dtype), alpha=damping)
                        g[w + c:w + e].addcmul_(term, coef, value=-1)
        X.add_(g)
        # 4. that step is the next pair's ΔX (its ΔG comes with the next round's residual)
        if d:
            used = set(self.order)
            p = next(s for s in range(d) if s not in used) if len(used) < d else self.order.pop(0)
            for w, r, n in segs:
                self.dX[p, r:r + n].copy_(g[w:w + n])
            self.pending = p
        self.prev = (lo, hi)
        return X

    def _weights(self, lo, hi, segs, g, held, reg, prefix):
        """γ [W, B, h] (state dtype's device, float64): the regularised normal equations
        of the valid pairs at each step (prefix-summed over steps when ``prefix``); a
        failed or non-finite solve falls back to γ = 0 (a damped Picard step)."""
        W, B, h = hi - lo, g.shape[1], len(held)
        dev = g.device
        H = torch.zeros((W, B, h, h), dtype=torch.float64, device=dev)
        rhs = torch.zeros((W, B, h), dtype=torch.float64, device=dev)
        per_row = max(1, _GRAM_CHUNK // max(1, g[0].numel()))
        for w, r, n in segs:
            for c in range(0, n, per_row):
                e = min(c + per_row, n)
                gi = g[w + c:w + e].flatten(2).to(torch.float64)
                cols = [self.dG[j, r + c:r + e].flatten(2).to(torch.float64) for j in held]
                for a_, A in enumerate(cols):
                    rhs[w + c:w + e, :, a_] = (A * gi).sum(-1)
                    for b_ in range(a_ + 1):
                        v = (A * cols[b_]).sum(-1)
                        H[w + c:w + e, :, a_, b_] = v
                        H[w + c:w + e, :, b_, a_] = v
        steps = torch.arange(lo, hi)
        valid = torch.stack([(steps >= self.span[j][0]) & (steps < self.span[j][1]) for j in held])
        v = valid.transpose(0, 1).to(dev, torch.float64)[:, None, :]          # [W, 1, h]
        # where(), not a product: a stale row's NaN must not survive as 0 · NaN
        pair_ok = (v[..., :, None] * v[..., None, :]) > 0
        H = torch.where(pair_ok, H, 0.0)
        rhs = torch.where(v > 0, rhs, 0.0)
        if prefix:
            H, rhs = H.cumsum(0), rhs.cumsum(0)
            H = torch.where(pair_ok, H, 0.0)
            rhs = torch.where(v > 0, rhs, 0.0)
        diag = torch.diagonal(H, dim1=-2, dim2=-1)
        scale = diag.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
        # regularise relative to the largest pair norm; pin pairs not valid at a step
        H = H + torch.diag_embed(reg * scale + (1.0 - v) * 1e12 * scale)
        sol, info = torch.linalg.solve_ex(H, rhs.unsqueeze(-1))
        gamma = sol.squeeze(-1) * v
        ok = (info == 0)[..., None] & torch.isfinite(gamma).all(-1, keepdim=True)
        return torch.where(ok, gamma, torch.zeros_like(gamma))
