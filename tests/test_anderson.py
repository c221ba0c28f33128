"""The Anderson mix against a direct constrained least-squares solve per (step, item)."""
import pytest
import torch

from deqir_fast.ops import anderson_mix


def naive(X, G, valid, beta, prefix):
    m, W, B = len(X), X[0].shape[0], X[0].shape[1]
    out = torch.empty_like(X[-1])
    for w in range(W):
        for b in range(B):
            keep = [j for j in range(m) if valid[j, w]]
            if prefix:
                rows = [torch.cat([G[j][lo, b].reshape(-1) for lo in range(w + 1)]) for j in keep]
            else:
                rows = [G[j][w, b].reshape(-1) for j in keep]
            Gm = torch.stack(rows, 1)                     # [n, k]
            # min ||Gm a|| s.t. sum a = 1: a = a_k + N c with N spanning sum-zero vectors
            k = len(keep)
            if k == 1:
                a = torch.ones(1, dtype=Gm.dtype)
            else:
                N = torch.zeros(k, k - 1, dtype=Gm.dtype)
                N[:-1] = torch.eye(k - 1)
                N[-1] = -1
                base = torch.zeros(k, dtype=Gm.dtype)
                base[-1] = 1
                c = torch.linalg.lstsq(Gm @ N, -(Gm @ base).unsqueeze(1)).solution.squeeze(1)
                a = base + N @ c
            out[w, b] = sum(a[i] * (X[j][w, b] + beta * G[j][w, b]) for i, j in enumerate(keep))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("m,W,B", [(1, 3, 2), (3, 5, 1), (4, 7, 3)])
def test_anderson_mix_matches_least_squares(dtype, prefix, m, W, B):
    gen = torch.Generator().manual_seed(m * 100 + W * 10 + B)
    X = [torch.randn(W, B, 3, 5, 7, generator=gen, dtype=dtype) for _ in range(m)]
    G = [torch.randn(W, B, 3, 5, 7, generator=gen, dtype=dtype) for _ in range(m)]
    valid = torch.ones(m, W, dtype=torch.bool)
    if m > 2:
        valid[0, W - 2:] = False          # the oldest entry had not seen the last steps
    ours = anderson_mix(X, G, valid, reg=0.0, damping=0.7, prefix=prefix)
    ref = naive(X, G, valid, 0.7, prefix)
    tol = 1e-4 if dtype == torch.float32 else 1e-9
    assert torch.allclose(ours, ref, rtol=tol, atol=tol)


def test_singular_history_falls_back_to_picard():
    X = [torch.randn(2, 1, 4) for _ in range(3)]
    G = [torch.zeros(2, 1, 4) for _ in range(3)]     # all-zero residuals: H = 0
    out = anderson_mix(X, G, torch.ones(3, 2, dtype=torch.bool), reg=0.0)
    assert torch.isfinite(out).all()
    assert torch.equal(out, X[-1])


NATIVE_RING = bool(getattr(__import__("torch").ops.deqir_fast, "anderson_mix", None)) or \
    __import__("deqir_fast.ops.native", fromlist=["status"]).status().ok


def _pad_history(hist, length):
    """The list history's padding (the solver before the ring): entries shorter than the
    window (recorded before new steps entered) get zero rows for the missing steps."""
    out = []
    for h in hist:
        if h.shape[0] < length:
            h = torch.cat([h, h.new_zeros((length - h.shape[0], *h.shape[1:]))])
        out.append(h)
    return out


@pytest.mark.parametrize("impl", ["torch", "native"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("rows,windows", [
    (6, [(0, 6), (0, 6), (1, 6), (2, 6), (2, 6), (4, 6)]),            # no window: frozen steps drop
    (4, [(0, 4), (1, 5), (1, 5), (3, 7), (4, 8), (4, 8), (6, 9)]),    # a sliding window wraps the ring
])
def test_ring_matches_the_list_history(dtype, prefix, rows, windows, impl):
    """AndersonRing against today's list-based history (the solver's Anderson before the
    ring: entries sliced as steps freeze, zero-padded and excluded where they had not
    seen a step) on fresh random iterates, history 3."""
    from deqir_fast.ops.anderson import AndersonRing
    gen = torch.Generator().manual_seed(rows)
    m, B, item = 3, 2, (3, 4, 5)
    ring = AndersonRing(m, rows, torch.zeros((B, *item), dtype=dtype))
    if impl == "native" and not (NATIVE_RING and hasattr(torch.ops.deqir_fast, "anderson_mix")):
        pytest.skip("native kernels unavailable")
    ring.native = impl == "native"
    Xh, Gh = [], []
    prev_lo = windows[0][0]
    for lo, hi in windows:
        Xh = [x[lo - prev_lo:] for x in Xh]                             # drop frozen steps
        Gh = [g[lo - prev_lo:] for g in Gh]
        prev_lo = lo
        X = torch.randn((hi - lo, B, *item), generator=gen, dtype=dtype)
        G = torch.randn((hi - lo, B, *item), generator=gen, dtype=dtype) * 0.1
        Xh, Gh = (Xh + [X.clone()])[-m:], (Gh + [G])[-m:]
        valid = torch.stack([torch.arange(hi - lo) < g.shape[0] for g in Gh])
        ref = anderson_mix(_pad_history(Xh, hi - lo), _pad_history(Gh, hi - lo), valid,
                           reg=1e-4, damping=0.8, prefix=prefix)
        if len(Xh) % 2:
            ring.push(lo, hi, X, G)
        else:                              # the solver's way: G = FX - X into the ring
            ring.push(lo, hi, X, FX=X + G)
            G.copy_(ring.G[ring.held()[-1], torch.arange(lo, hi) % rows])
        ours = ring.mix(lo, hi, reg=1e-4, damping=0.8, prefix=prefix)
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        assert torch.allclose(ours, ref, rtol=tol, atol=tol), (lo, hi)
    ring.forget()
    assert ring.held() == []


@pytest.mark.parametrize("impl", ["torch", "native"])
def test_ring_never_reads_stale_rows(impl):
    """After a divergence restart (forget) the ring still holds non-finite rows; entries
    excluded for a step must contribute nothing, whatever their rows hold."""
    from deqir_fast.ops.anderson import AndersonRing
    if impl == "native" and not hasattr(torch.ops.deqir_fast, "anderson_mix"):
        pytest.skip("native kernels unavailable")
    gen = torch.Generator().manual_seed(0)
    B, item = 2, (3, 4, 5)
    rnd = lambda W: torch.randn((W, B, *item), generator=gen, dtype=torch.float64)  # noqa: E731
    poisoned = AndersonRing(3, 6, torch.zeros((B, *item), dtype=torch.float64))
    clean = AndersonRing(3, 6, torch.zeros((B, *item), dtype=torch.float64))
    poisoned.native = clean.native = impl == "native"
    for _ in range(3):
        poisoned.push(0, 6, torch.full((6, B, *item), float("nan"), dtype=torch.float64),
                      torch.full((6, B, *item), float("inf"), dtype=torch.float64))
    poisoned.forget()
    for lo, hi in [(2, 6), (2, 6), (3, 6)]:
        X, G = rnd(hi - lo), rnd(hi - lo)
        poisoned.push(lo, hi, X, G)
        clean.push(lo, hi, X, G)
        a, b = poisoned.mix(lo, hi, prefix=True), clean.mix(lo, hi, prefix=True)
        assert torch.isfinite(a).all() and torch.equal(a, b)


def _toy_map(X, lo, b):
    """A nonlinear contraction per step, coupling the elements of a state."""
    return 0.6 * torch.tanh(X) + 0.25 * X.roll(1, -1) + b[lo:lo + X.shape[0]]


@pytest.mark.parametrize("prefix", [False, True])
@pytest.mark.parametrize("rows,windows", [
    (6, [(0, 6), (0, 6), (1, 6), (2, 6), (2, 6), (4, 6), (4, 6)]),     # frozen steps drop
    (4, [(0, 4), (1, 5), (1, 5), (3, 7), (4, 8), (4, 8), (6, 9)]),     # a sliding window wraps
])
def test_difference_ring_gives_the_constrained_rings_iterates(prefix, rows, windows):
    """DifferenceRing (history as differences) against AndersonRing (X, G entries) on the
    solver's own loop over fresh random states: the same Anderson iterates (both forms
    solve the same least-squares problem; tiny regularisation, float64). Steps entering
    the window start from the last state, as in the solver."""
    from deqir_fast.ops.anderson import AndersonRing, DifferenceRing
    gen = torch.Generator().manual_seed(rows)
    m, B, item, S = 3, 2, (3, 4, 5), windows[-1][1]
    b = torch.randn((S, B, *item), generator=gen, dtype=torch.float64)
    start = torch.randn((S, B, *item), generator=gen, dtype=torch.float64)
    like = start[0]
    rings = {"constrained": AndersonRing(m, rows, like),
             "difference": DifferenceRing(m, rows, like, torch.float64)}
    rings["constrained"].native = False
    states = {k: start.clone() for k in rings}
    hi_prev = windows[0][1]
    for lo, hi in windows:
        for k, ring in rings.items():
            Xall = states[k]
            if hi > hi_prev:
                Xall[hi_prev:hi] = Xall[hi_prev - 1]
            X = Xall[lo:hi]
            FX = _toy_map(X, lo, b)
            if k == "constrained":
                ring.push(lo, hi, X, FX=FX)
                ring.mix(lo, hi, reg=1e-13, damping=0.8, prefix=prefix, out=X)
            else:
                ring.update(lo, hi, X, FX, reg=1e-13, damping=0.8, prefix=prefix)
        hi_prev = hi
        a, d = states["constrained"][lo:hi], states["difference"][lo:hi]
        assert torch.allclose(a, d, rtol=1e-8, atol=1e-8), ((lo, hi), (a - d).abs().max())
    # the history did something: not a damped Picard step
    picard = start.clone()[windows[-1][0]:windows[-1][1]]
    assert not torch.allclose(states["difference"][windows[-1][0]:windows[-1][1]], picard)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_difference_ring_stores_its_history_in_the_given_dtype(dtype):
    """History m holds m - 1 (ΔX, ΔG) pairs and the last residual, all in ``dtype``."""
    from deqir_fast.ops.anderson import DifferenceRing
    like = torch.zeros((2, 3, 4, 5))
    ring = DifferenceRing(4, 7, like, dtype)
    held = [ring.dX, ring.dG, ring.g_prev]
    assert all(t.dtype == dtype for t in held)
    assert sum(t.numel() for t in held) == (2 * 3 + 1) * 7 * like.numel()


def test_difference_ring_forgets_poisoned_history():
    """After forget() (the divergence restart) nothing from before enters the mix, even
    rows holding NaN/Inf: the next update is the damped Picard step."""
    from deqir_fast.ops.anderson import DifferenceRing
    gen = torch.Generator().manual_seed(3)
    like = torch.zeros((2, 3, 4))
    ring = DifferenceRing(3, 5, like, torch.bfloat16)
    for _ in range(3):
        X = torch.full((5, 2, 3, 4), float("nan"))
        ring.update(0, 5, X, torch.full_like(X, float("inf")))
    ring.forget()
    X = torch.randn((4, 2, 3, 4), generator=gen)
    FX = torch.randn((4, 2, 3, 4), generator=gen)
    want = X + 0.7 * (FX - X)
    got = ring.update(1, 5, X.clone(), FX, damping=0.7)
    assert torch.isfinite(got).all() and torch.allclose(got, want, atol=1e-6)


@pytest.mark.parametrize("prefix", [False, True])
def test_difference_ring_never_reads_stale_rows(prefix):
    """After forget() the rows still hold the poisoned history. When the window grows onto
    steps a held pair does not span, those steps get γ = 0 from that pair, and its stale
    rows must contribute nothing (not 0 · NaN): same iterates as a ring never poisoned."""
    from deqir_fast.ops.anderson import DifferenceRing
    gen = torch.Generator().manual_seed(4)
    like = torch.zeros((2, 3, 4), dtype=torch.float64)
    poisoned = DifferenceRing(3, 6, like, torch.float64)
    clean = DifferenceRing(3, 6, like, torch.float64)
    for _ in range(3):
        X = torch.full((6, 2, 3, 4), float("nan"), dtype=torch.float64)
        poisoned.update(0, 6, X, torch.full_like(X, float("inf")))
    poisoned.forget()
    start = torch.randn((6, 2, 3, 4), generator=gen, dtype=torch.float64)
    b = torch.randn((6, 2, 3, 4), generator=gen, dtype=torch.float64)
    states = [start.clone(), start.clone()]
    for lo, hi in [(0, 3), (0, 3), (0, 6), (0, 6), (1, 6)]:
        for ring, Xall in zip((poisoned, clean), states):
            X = Xall[lo:hi]
            ring.update(lo, hi, X, _toy_map(X, lo, b), damping=0.8, prefix=prefix)
        assert torch.isfinite(states[0]).all(), (lo, hi)
        assert torch.equal(states[0], states[1]), (lo, hi)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_difference_ring_stays_close_to_the_full_precision_mix(dtype):
    """Rounded to 16 bits, the history still gives Anderson's iterates: after each round
    the 16-bit ring's states are within 5% of the float64 constrained ring's step,
    while a damped Picard step (a history thrown away) is not (the toy map above)."""
    from deqir_fast.ops.anderson import AndersonRing, DifferenceRing
    gen = torch.Generator().manual_seed(7)
    m, B, item, S = 4, 2, (3, 4, 5), 6
    b = torch.randn((S, B, *item), generator=gen, dtype=torch.float64)
    start = torch.randn((S, B, *item), generator=gen, dtype=torch.float64)
    full, low = AndersonRing(m, S, start[0]), DifferenceRing(m, S, start[0], dtype)
    full.native = False
    Xf, Xl = start.clone(), start.clone()
    far_from_picard = False
    for _ in range(6):
        before = Xf.clone()
        FXf = _toy_map(Xf, 0, b)
        picard = Xf + 0.8 * (FXf - Xf)
        full.push(0, S, Xf, FX=FXf)
        full.mix(0, S, reg=1e-10, damping=0.8, out=Xf)
        low.update(0, S, Xl, _toy_map(Xl, 0, b), reg=1e-10, damping=0.8)
        step = (Xf - before).abs().max()
        assert (Xl - Xf).abs().max() <= 0.05 * step + 1e-12
        far_from_picard |= bool((picard - Xf).abs().max() > 0.2 * step)
    assert far_from_picard
