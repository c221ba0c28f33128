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
