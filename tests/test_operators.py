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


def conv_reference(kh, kw, padding):
    """conv2d with the outer-product kernel on a padded image: every tap present."""
    k = torch.outer(kh, kw)[None, None]
    rh, rw = len(kh) // 2, len(kw) // 2

    def apply(x):
        C = x.shape[1]
        mode = "reflect" if padding == "reflect" else "constant"
        xp = nnf.pad(x, (rw, rw, rh, rh), mode=mode)
        return nnf.conv2d(xp, k.expand(C, 1, -1, -1).to(x), groups=C)
    return apply


def cs_reference(mask, transform):
    import numpy as np
    import scipy.fft
    import scipy.linalg

    def apply(x):
        a = x.numpy()
        if transform == "dct":
            z = scipy.fft.dctn(a, type=2, norm="ortho", axes=(-2, -1))
        else:
            H, W = a.shape[-2:]
            hh = scipy.linalg.hadamard(H) / np.sqrt(H)
            hw = scipy.linalg.hadamard(W) / np.sqrt(W)
            z = hh @ a @ hw.T
        return torch.from_numpy(np.ascontiguousarray(z)) * mask
    return apply


def make(name, shape, gen):
    C, H, W = shape
    if name == "bicubic2":
        return ops.BicubicSuperResolution(2, shape), lambda x: nnf.interpolate(
            x, scale_factor=0.5, mode="bicubic", antialias=True, align_corners=False)
    if name.startswith("blur"):
        _, kind, padding = name.split("_")
        if kind == "gauss":
            kh = kw = ops.gaussian_kernel(1.2)
        elif kind == "aniso":
            kh, kw = ops.gaussian_kernel(1.5), ops.gaussian_kernel(0.6)
        else:
            kh, kw = ops.uniform_kernel(3), ops.uniform_kernel(5)
        op = ops.Deblurring(shape, kh, kw, padding=padding, threshold=0.0)
        return op, conv_reference(kh, kw, padding)
    if name == "colorize":
        return ops.Colorization(shape), lambda x: x.mean(1, keepdim=True)
    if name.startswith("cs_"):
        transform = name.split("_")[1]
        op = ops.CompressedSensing(shape, 0.3, seed=1, transform=transform)
        return op, cs_reference(op.singulars, transform)
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


NAMES = ["identity", "inpainting", "inpainting_channels", "sr2", "sr4", "bicubic2",
         "blur_gauss_zero", "blur_gauss_reflect", "blur_aniso_zero", "blur_aniso_reflect",
         "blur_uniform_zero", "blur_uniform_reflect", "colorize", "cs_dct", "cs_hadamard"]


def applicable(name, shape):
    C, H, W = shape
    if name == "sr4" and (H % 4 or W % 4):
        return False
    if name == "colorize" and C != 3:
        return False
    if name == "cs_hadamard" and (H & (H - 1) or W & (W - 1)):
        return False
    return True


@pytest.mark.parametrize("name,shape", [(n, s) for n in NAMES for s in SHAPES if applicable(n, s)])
def test_decomposition_matches_dense(name, shape):
    gen = torch.Generator().manual_seed(len(name) * 1000 + sum(shape))
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
    s_exact = getattr(op, "_singulars_exact", op.singulars).expand(shape)
    UsVt = dense(lambda z: op.U(s_exact * op.Vt(z)), shape)
    assert torch.allclose(UsVt, A, atol=1e-12)
    y_shape = y.shape[1:]
    At = dense(op.At, y_shape)
    assert torch.allclose(At, A.T, atol=1e-12)
    pinv = dense(op.pinv, y_shape)
    ref = torch.linalg.pinv(A, rtol=ops.NUMERICAL_ZERO)
    # relative to the pseudo-inverse's size: an unthresholded blur's is ~1e3
    assert torch.allclose(pinv, ref, rtol=0, atol=1e-9 * max(1.0, ref.abs().max().item()))
    assert torch.isfinite(op.pinv(y)).all()
    # the singular values are those of A (0 in the null space)
    sv = torch.linalg.svdvals(A)
    ours = torch.sort(s_exact.reshape(-1), descending=True).values
    k = sv.numel()
    assert torch.allclose(ours[:k], sv, atol=1e-12)
    assert (ours[k:] == 0).all()
    # Vᵀ is orthonormal as a dense matrix too
    Vt = dense(op.Vt, shape)
    assert torch.allclose(Vt @ Vt.T, torch.eye(Vt.shape[0], dtype=Vt.dtype), atol=1e-12)


@pytest.mark.parametrize("threshold", [1e-3, 1e-2, 1e-1])
def test_blur_threshold_zeroes_small_singular_values(threshold):
    shape = (1, 12, 12)
    op = ops.Deblurring.gaussian(shape, 1.5, padding="zero", threshold=threshold)
    A = dense(op.A, shape)
    # A stays the blur; singulars and A⁺ drop what is below the threshold
    sv = torch.linalg.svdvals(A)
    kept = torch.sort(op.singulars.reshape(-1), descending=True).values
    assert torch.allclose(kept, torch.where(sv > threshold * sv[0], sv, 0 * sv), atol=1e-12)
    pinv = dense(op.pinv, shape)
    assert torch.allclose(pinv, torch.linalg.pinv(A, rtol=threshold), atol=1e-9)
    y = op.A(torch.randn(2, *shape, dtype=torch.float64))
    assert torch.isfinite(op.pinv(y)).all()
    assert op.pinv(y).abs().max() < 10 / threshold


def test_every_tap_of_the_blur_is_present():
    k = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0], dtype=torch.float64)
    m = ops.convolution_matrix(9, k, "zero")
    assert torch.equal(m[4, 2:7], k)
    assert torch.equal(m[0, :3], k[2:])
    assert torch.equal(m[8, 6:], k[:3])
    r = ops.convolution_matrix(9, k, "reflect")
    assert torch.allclose(r.sum(1), torch.full((9,), float(k.sum()), dtype=torch.float64))


def test_construction_is_fast_at_256():
    import time
    shape = (3, 256, 256)
    for make_op in (lambda: ops.Inpainting.random(shape, 0.7), lambda: ops.SuperResolution(4, shape),
                    lambda: ops.BicubicSuperResolution(4, shape),
                    lambda: ops.Deblurring.gaussian(shape, 2.0, padding="reflect"),
                    lambda: ops.Colorization(shape), lambda: ops.CompressedSensing(shape, 0.25)):
        t0 = time.perf_counter()
        make_op()
        # Generous bound: this machine is slow; the point is no O(n²) construction.
        assert time.perf_counter() - t0 < 2.0


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


class FakePhysics:
    """deepinv's DecomposablePhysics interface (A = U(mask * V_adjoint(x))), here a DCT
    with a random mask; deepinv itself cannot be installed on this CPU-only machine."""

    def __init__(self, shape, thin=False, skew=False, complex_=False):
        C, H, W = shape
        self.dh, self.dw = ops.dct_matrix(H), ops.dct_matrix(W)
        if skew:
            self.dh = self.dh * 1.1
        self.thin, self.complex_ = thin, complex_
        self.mask = (torch.rand(1, C, H, W, generator=torch.Generator().manual_seed(0)) > 0.5).double()

    def V_adjoint(self, x):
        z = self.dh.to(x) @ x @ self.dw.to(x).T
        if self.complex_:
            z = z.to(torch.complex128)
        return z.flatten(1) if self.thin else z

    def V(self, z):
        return self.dh.to(z).T @ z @ self.dw.to(z)

    def U(self, z):
        return z

    def U_adjoint(self, y):
        return y


def test_deepinv_style_adapter_matches_the_dense_operator():
    shape = (2, 4, 4)
    phys = FakePhysics(shape)
    op = ops.from_deepinv(phys, shape)
    x = torch.randn(3, *shape, dtype=torch.float64)
    assert torch.allclose(op.A(x), phys.mask[0] * phys.V_adjoint(x))
    A = dense(op.A, shape)
    assert torch.allclose(dense(op.pinv, shape), torch.linalg.pinv(A), atol=1e-10)
    assert torch.allclose(op.Vt(op.V(x)), x, atol=1e-12)


@pytest.mark.parametrize("kw,match", [({"thin": True}, "thin"), ({"skew": True}, "orthonormal"),
                                      ({"complex_": True}, "complex")])
def test_deepinv_style_adapter_refuses_what_it_cannot_represent(kw, match):
    with pytest.raises(ValueError, match=match):
        ops.from_deepinv(FakePhysics((2, 4, 4), **kw), (2, 4, 4))
    with pytest.raises(TypeError, match="DecomposablePhysics"):
        ops.from_deepinv(object(), (2, 4, 4))
