"""Operators against explicit dense matrices built independently."""
import pytest
import torch
import torch.nn.functional as nnf

from deqir_fast import operators as ops


def dense(fn, in_shape):
    """The matrix of a linear map on [1, *in_shape] images, column by column."""
    n = int(torch.tensor(in_shape).prod())
    eye = torch.eye(n, dtype=torch.float64).view(n, *in_shape)
    return fn(eye).reshape(n, -1).T


SHAPES = [(1, 8, 8), (3, 8, 8), (3, 12, 12), (1, 8, 12), (3, 8, 12)]


def make(name, shape, gen):
    C, H, W = shape
    if name == "identity":
        return ops.Identity(), lambda x: x
    if name == "inpainting":
        m = (torch.rand((H, W), generator=gen) > 0.5).double()
        return ops.Inpainting(m), lambda x: x * m
    if name == "inpainting_channels":
        m = (torch.rand((C, H, W), generator=gen) > 0.5).double()
        return ops.Inpainting(m), lambda x: x * m
    if name == "sr2":
        return ops.SuperResolution(2, shape), lambda x: nnf.avg_pool2d(x, 2)
    if name == "sr4":
        return ops.SuperResolution(4, shape), lambda x: nnf.avg_pool2d(x, 4)
    raise ValueError(name)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("name", ["identity", "inpainting", "inpainting_channels", "sr2", "sr4"])
def test_decomposition_matches_dense(name, shape):
    gen = torch.Generator().manual_seed(hash((name, shape)) % 1000)
    op, reference = make(name, shape, gen)
    x = torch.randn((3, *shape), generator=gen, dtype=torch.float64)
    A = dense(reference, shape)
    y = reference(x)
    assert torch.allclose(op.A(x), y, atol=1e-12)
    # Vᵀ(V z) = z, V(Vᵀ x) = x
    assert torch.allclose(op.Vt(op.V(x)), x, atol=1e-12)
    assert torch.allclose(op.V(op.Vt(x)), x, atol=1e-12)
    # U diag(s) Vᵀ, Aᵀ and A⁺ against the dense matrix
    s = op.singulars.expand(shape)
    UsVt = dense(lambda z: op.U(s * op.Vt(z)), shape)
    assert torch.allclose(UsVt, A, atol=1e-12)
    y_shape = y.shape[1:]
    At = dense(op.At, y_shape)
    assert torch.allclose(At, A.T, atol=1e-12)
    pinv = dense(op.pinv, y_shape)
    assert torch.allclose(pinv, torch.linalg.pinv(A), atol=1e-10)
    assert torch.isfinite(op.pinv(y)).all()
    # the singular values are those of A (0 in the null space)
    sv = torch.linalg.svdvals(A)
    ours = torch.sort(s.reshape(-1), descending=True).values
    k = sv.numel()
    assert torch.allclose(ours[:k], sv, atol=1e-12)
    assert (ours[k:] == 0).all()


def test_float32_buffers_are_cached_per_dtype():
    op = ops.SuperResolution(2, (3, 8, 8))
    x = torch.randn(2, 3, 8, 8)
    assert op.Vt(x).dtype == torch.float32
    assert torch.allclose(op.V(op.Vt(x)), x, atol=1e-5)


@pytest.mark.parametrize("bad,err", [
    (lambda: ops.Inpainting(torch.rand(4, 4) + 0.1), ValueError),
    (lambda: ops.Inpainting([[1, 0]]), TypeError),
    (lambda: ops.Inpainting(torch.ones(2, 2, 2, 2)), ValueError),
    (lambda: ops.SuperResolution(3, (3, 8, 8)), ValueError),
    (lambda: ops.SuperResolution(0, (3, 8, 8)), ValueError),
    (lambda: ops.SuperResolution(2, (8, 8)), ValueError),
])
def test_bad_construction(bad, err):
    with pytest.raises(err):
        bad()
