"""Degradation operators A with an exact orthonormal decomposition A = U diag(s) Vᵀ.

Every operator acts on image-shaped batches ``x: [B, C, H, W]`` and keeps the spectral
coefficients image-shaped too: ``Vt(x)`` has x's shape, ``singulars`` broadcasts to it
(0 marks the null space), ``Ut(y)`` writes the measurement's coefficients into that same
layout (0 elsewhere) and ``U`` reads them back. Hence, with no flattening anywhere,

    A(x)    = U(singulars * Vt(x))
    At(y)   = V(singulars * Ut(y))
    pinv(y) = V(singulars⁺ * Ut(y)),   singulars⁺ = 1/s where s > 0, else 0.

Shapes given as ``None`` (e.g. the channel count of a 2-D inpainting mask) match any size.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

Shape = tuple  # (C, H, W), entries int or None (any size)
NUMERICAL_ZERO = 1e-10   # relative singular values below this are 0 whatever the threshold


def _shape_matches(shape: Sequence[int], pattern: Shape) -> bool:
    return len(shape) == len(pattern) and all(p is None or p == s for s, p in zip(shape, pattern))


def _fmt(pattern: Shape) -> str:
    return "(" + ", ".join("*" if p is None else str(p) for p in pattern) + ")"


class Operator:
    """Base class: subclasses set ``x_shape``, ``y_shape`` and ``_singulars`` (float64,
    broadcastable to ``x_shape``) and implement ``Vt``, ``V``, ``Ut`` and ``U``."""

    x_shape: Shape
    y_shape: Shape
    _singulars: torch.Tensor

    def __init__(self) -> None:
        self._cache: dict = {}

    # -- the decomposition -------------------------------------------------------
    def Vt(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def V(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def Ut(self, y: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def U(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def singulars(self) -> torch.Tensor:
        """Singular values laid out like ``Vt``'s output (broadcastable), float64."""
        return self._singulars

    def singulars_as(self, like: torch.Tensor) -> torch.Tensor:
        return self._on(like, "singulars", lambda: self._singulars)

    def singulars_pinv_as(self, like: torch.Tensor) -> torch.Tensor:
        def make():
            s = self._singulars
            return torch.where(s > 0, 1.0 / torch.where(s > 0, s, torch.ones_like(s)),
                               torch.zeros_like(s))
        return self._on(like, "singulars_pinv", make)

    def _exact_as(self, like: torch.Tensor) -> torch.Tensor:
        exact = getattr(self, "_singulars_exact", None)
        return self.singulars_as(like) if exact is None else self._on(like, "exact", lambda: exact)

    # -- derived maps ------------------------------------------------------------
    # A and Aᵀ use the exact singular values (a blur stays the blur); the samplers and
    # A⁺ use ``singulars``, where values below an operator's threshold are 0.
    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.U(self._exact_as(x) * self.Vt(x))

    def At(self, y: torch.Tensor) -> torch.Tensor:
        z = self.Ut(y)
        return self.V(self._exact_as(z) * z)

    def pinv(self, y: torch.Tensor) -> torch.Tensor:
        z = self.Ut(y)
        return self.V(self.singulars_pinv_as(z) * z)

    # -- checks ------------------------------------------------------------------
    def check_x(self, name: str, x: torch.Tensor) -> None:
        if x.dim() != 4 or not _shape_matches(tuple(x.shape[1:]), self.x_shape):
            raise ValueError(f"{name} must have shape [B, {_fmt(self.x_shape)[1:-1]}] for "
                             f"{type(self).__name__}, got {tuple(x.shape)}")

    def check_y(self, name: str, y: torch.Tensor, x_shape: Sequence[int]) -> None:
        """``y`` must be a measurement of an image of shape ``x_shape`` = [B, C, H, W]."""
        want = self.y_shape_for(tuple(x_shape[1:]))
        if y.dim() != 4 or y.shape[0] not in (1, x_shape[0]) or tuple(y.shape[1:]) != want:
            raise ValueError(f"{name} does not fit {type(self).__name__}: expected shape "
                             f"[{x_shape[0]} or 1, {', '.join(map(str, want))}], "
                             f"got {tuple(y.shape)}")

    def y_shape_for(self, x_shape: Sequence[int]) -> tuple:
        return tuple(x if p is None else p for x, p in zip(x_shape, self.y_shape))

    # -- helpers -----------------------------------------------------------------
    def _on(self, like: torch.Tensor, key: str, make):
        """A float64 buffer cast to ``like``'s dtype and device, cached per pair."""
        full_key = (key, like.dtype, like.device)
        hit = self._cache.get(full_key)
        if hit is None:
            hit = make().to(device=like.device, dtype=like.dtype)
            self._cache[full_key] = hit
        return hit

    def __repr__(self) -> str:
        return f"{type(self).__name__}(x_shape={_fmt(self.x_shape)}, y_shape={_fmt(self.y_shape)})"


class _PixelBasis(Operator):
    """Operators diagonal in pixel space: V = U = I."""

    def Vt(self, x):
        return x

    def V(self, z):
        return z

    def Ut(self, y):
        return y

    def U(self, z):
        return z


class Masked(_PixelBasis):
    """A = diag(mask): V = U = I, the singular values are the 0/1 mask itself and y is
    image-shaped, 0 where unobserved. The base of pixel inpainting."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dim() not in (2, 3):
            raise ValueError(f"mask must have shape [H, W] or [C, H, W], got {tuple(mask.shape)}")
        m = mask.detach().to(torch.float64).cpu()
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("mask must hold only 0 and 1 (or be boolean)")
        if m.dim() == 2:
            m = m.unsqueeze(0)
            self.x_shape = (None, *m.shape[1:])
        else:
            self.x_shape = tuple(m.shape)
        self.y_shape = self.x_shape
        self._singulars = m


class Inpainting(Masked):
    """Keep the pixels where ``mask`` is 1. ``mask``: [H, W] (all channels) or [C, H, W]."""

    @classmethod
    def box(cls, shape: Sequence[int], top: int, left: int, height: int, width: int) -> "Inpainting":
        """Everything but a ``height`` x ``width`` box at (top, left) is kept."""
        _, H, W = (int(s) for s in shape)
        if not (0 <= top < top + height <= H and 0 <= left < left + width <= W):
            raise ValueError(f"the box ({top}, {left}, {height}, {width}) does not fit {H}x{W}")
        mask = torch.ones(H, W, dtype=torch.float64)
        mask[top:top + height, left:left + width] = 0
        return cls(mask)

    @classmethod
    def random(cls, shape: Sequence[int], missing: float, seed: int = 0,
               per_channel: bool = False) -> "Inpainting":
        """A seeded fraction ``missing`` of the pixels (of each channel's values with
        ``per_channel``) is dropped."""
        if not 0.0 <= float(missing) < 1.0:
            raise ValueError(f"missing must lie in [0, 1), got {missing}")
        C, H, W = (int(s) for s in shape)
        size = (C, H, W) if per_channel else (H, W)
        rand = torch.rand(size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        return cls((rand >= float(missing)).to(torch.float64))


class Identity(_PixelBasis):
    """Denoising: A = I, for images of any shape (or of ``shape`` = (C, H, W) if given)."""

    def __init__(self, shape: Optional[Sequence[int]] = None):
        super().__init__()
        self.x_shape = (None, None, None) if shape is None else tuple(int(s) for s in shape)
        self.y_shape = self.x_shape
        self._singulars = torch.ones(1, 1, 1, dtype=torch.float64)


def _mode_apply(x: torch.Tensor, matrix: Optional[torch.Tensor], dim: int) -> torch.Tensor:
    """Multiply the ``dim`` axis (1: channel, 2: height, 3: width) of x by ``matrix``."""
    if matrix is None:
        return x
    if dim == 3:
        return torch.matmul(x, matrix.transpose(0, 1))
    if dim == 2:
        return torch.matmul(matrix, x)
    return torch.einsum("oc,bchw->bohw", matrix, x)


def _resize_axis(z: torch.Tensor, dim: int, size: int) -> torch.Tensor:
    """Crop or zero-pad axis ``dim`` of z at its end to ``size``."""
    n = z.shape[dim]
    if n == size:
        return z
    if n > size:
        return z.narrow(dim, 0, size)
    pad_shape = list(z.shape)
    pad_shape[dim] = size - n
    return torch.cat([z, z.new_zeros(pad_shape)], dim=dim)


class Separable(Operator):
    """A = A_c ⊗ A_h ⊗ A_w: a matrix for each image axis (``None`` = identity).

    Each factor's SVD is taken once in float64 (full, square U and V), so the whole
    decomposition is exact: Vᵀ applies the factors' Vᵀ along their axes and the
    singular values are the outer product of the factors' ones. Products at or below
    ``threshold`` times the largest count as 0 in ``singulars`` (the null space seen by
    the samplers and A⁺); ``A`` itself keeps them all.
    The measurement is y: [B, c, h, w] with (c, h, w) the factors' row counts.
    """

    def __init__(self, shape: Sequence[int], channel=None, height=None, width=None,
                 threshold: float = 1e-6):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
        self.x_shape = tuple(int(s) for s in shape)
        self.threshold = float(threshold)
        factors = []
        y_shape, svals = [], []
        for axis, (n, a) in enumerate(zip(self.x_shape, (channel, height, width))):
            if a is None:
                factors.append(None)
                y_shape.append(n)
                svals.append(torch.ones(n, dtype=torch.float64))
                continue
            a = torch.as_tensor(a, dtype=torch.float64)
            if a.dim() != 2 or a.shape[1] != n:
                raise ValueError(f"the factor for axis {'CHW'[axis]} must be a matrix with {n} "
                                 f"columns, got shape {tuple(a.shape)}")
            u, s, vh = torch.linalg.svd(a, full_matrices=True)
            factors.append((u, vh))
            y_shape.append(a.shape[0])
            svals.append(_resize_axis(s, 0, n))
        self._factors = factors
        self.y_shape = tuple(y_shape)
        s = svals[0][:, None, None] * svals[1][None, :, None] * svals[2][None, None, :]
        # Below 1e-10 of the largest a singular value is rounding noise (a box blur's
        # exact zeros come out of the SVD as ~1e-17): never invert those.
        cut = max(self.threshold, NUMERICAL_ZERO) * float(s.max()) if s.numel() else 0.0
        self._singulars_exact = s
        self._singulars = torch.where(s > cut, s, torch.zeros_like(s))

    def _matrix(self, like, axis: int, which: str):
        f = self._factors[axis]
        if f is None:
            return None
        u, vh = f
        make = {"Vt": lambda: vh, "V": lambda: vh.T, "Ut": lambda: u.T, "U": lambda: u}[which]
        return self._on(like, f"{which}{axis}", make)

    def _apply(self, x, which):
        for axis in range(3):
            x = _mode_apply(x, self._matrix(x, axis, which), axis + 1)
        return x

    def Vt(self, x):
        return self._apply(x, "Vt")

    def V(self, z):
        return self._apply(z, "V")

    def Ut(self, y):
        z = self._apply(y, "Ut")
        for axis in range(3):
            z = _resize_axis(z, axis + 1, self.x_shape[axis])
        return z

    def U(self, z):
        for axis in range(3):
            z = _resize_axis(z, axis + 1, self.y_shape[axis])
        return self._apply(z, "U")


def block_average_matrix(n: int, factor: int) -> torch.Tensor:
    """The (n/factor x n) matrix averaging consecutive blocks of ``factor`` samples."""
    if n % factor:
        raise ValueError(f"image size {n} is not divisible by the factor {factor}")
    return torch.kron(torch.eye(n // factor, dtype=torch.float64),
                      torch.full((1, factor), 1.0 / factor, dtype=torch.float64))


class SuperResolution(Separable):
    """Downsampling by averaging ``factor`` x ``factor`` blocks (``avg_pool2d``) of
    images of ``shape`` = (C, H, W); y: [B, C, H/factor, W/factor]."""

    _filter = staticmethod(lambda n, factor: block_average_matrix(n, factor))

    def __init__(self, factor: int, shape: Sequence[int], threshold: float = 1e-6):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
        _, h, w = (int(s) for s in shape)
        super().__init__(shape, height=self._filter(h, factor), width=self._filter(w, factor),
                         threshold=threshold)
        self.factor = factor


def _keys_cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """Keys' cubic convolution kernel (a = -0.5: the "bicubic" of PIL and torch)."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return torch.where(x <= 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


def bicubic_matrix(n: int, factor: int) -> torch.Tensor:
    """The (n/factor x n) antialiased bicubic downsampling matrix: output i is centred at
    input coordinate (i + 0.5)·factor - 0.5, taps weigh k((j - centre)/factor), taps
    outside the image are dropped and each row is renormalised to sum 1 (as
    ``torch.nn.functional.interpolate(..., mode="bicubic", antialias=True)`` does)."""
    if n % factor:
        raise ValueError(f"image size {n} is not divisible by the factor {factor}")
    m = n // factor
    centre = (torch.arange(m, dtype=torch.float64) + 0.5) * factor - 0.5
    j = torch.arange(n, dtype=torch.float64)
    w = _keys_cubic((j[None, :] - centre[:, None]) / factor)
    return w / w.sum(1, keepdim=True)


def gaussian_kernel(sigma: float, radius: Optional[int] = None) -> torch.Tensor:
    """A normalised 1-D Gaussian of std ``sigma`` with taps -radius..radius
    (default radius ceil(3 sigma))."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    r = int(radius) if radius is not None else max(1, int(torch.tensor(3.0 * sigma).ceil()))
    x = torch.arange(-r, r + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def uniform_kernel(size: int) -> torch.Tensor:
    """A normalised box of ``size`` (odd) taps."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or size % 2 == 0:
        raise ValueError(f"size must be a positive odd int, got {size!r}")
    return torch.full((size,), 1.0 / size, dtype=torch.float64)


def convolution_matrix(n: int, kernel: torch.Tensor, padding: str = "zero") -> torch.Tensor:
    """The (n x n) matrix of a "same"-size 1-D correlation with an odd-length ``kernel``:
    y[i] = Σ_k kernel[k] x[i + k - r], r = len//2, every tap present. Out-of-range
    samples are 0 (``padding="zero"``) or mirrored without repeating the edge
    (``"reflect"``: x[-1] = x[1], as ``torch.nn.functional.pad(mode="reflect")``)."""
    kernel = torch.as_tensor(kernel, dtype=torch.float64).flatten()
    L = kernel.numel()
    if L % 2 == 0:
        raise ValueError(f"kernel must have an odd number of taps, got {L}")
    r = L // 2
    if padding not in ("zero", "reflect"):
        raise ValueError(f"padding must be 'zero' or 'reflect', got {padding!r}")
    if padding == "reflect" and r >= n:
        raise ValueError(f"reflect padding needs a kernel radius below the size {n}, got {r}")
    mat = torch.zeros(n, n, dtype=torch.float64)
    rows = torch.arange(n)
    for k in range(L):
        cols = rows + k - r
        if padding == "reflect":
            cols = torch.where(cols < 0, -cols, cols)
            cols = torch.where(cols >= n, 2 * (n - 1) - cols, cols)
            mat.index_put_((rows, cols), kernel[k].expand(n), accumulate=True)
        else:
            ok = (cols >= 0) & (cols < n)
            mat.index_put_((rows[ok], cols[ok]), kernel[k].expand(int(ok.sum())), accumulate=True)
    return mat


class BicubicSuperResolution(SuperResolution):
    """Downsampling by ``factor`` with the antialiased bicubic filter (the Kronecker
    product of two 1-D matrices, see ``bicubic_matrix``)."""

    _filter = staticmethod(lambda n, factor: bicubic_matrix(n, factor))


class Deblurring(Separable):
    """A separable blur: ``kernel_h`` along the height, ``kernel_w`` (default the same)
    along the width, "same" output size, ``padding`` "zero" or "reflect".

    A blur's small singular values make A⁺ amplify noise without bound; those below
    ``threshold`` times the largest count as 0. The default 1e-2 (DDRM's own code zeroes
    below 3e-2 for its deblurring) keeps A⁺'s gain at most 100.
    """

    def __init__(self, shape: Sequence[int], kernel_h: torch.Tensor,
                 kernel_w: Optional[torch.Tensor] = None, padding: str = "zero",
                 threshold: float = 1e-2):
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
        _, h, w = (int(s) for s in shape)
        kernel_w = kernel_h if kernel_w is None else kernel_w
        super().__init__(shape, height=convolution_matrix(h, kernel_h, padding),
                         width=convolution_matrix(w, kernel_w, padding), threshold=threshold)
        self.padding = padding

    @classmethod
    def gaussian(cls, shape, sigma: float, sigma_w: Optional[float] = None, **kw) -> "Deblurring":
        return cls(shape, gaussian_kernel(sigma),
                   gaussian_kernel(sigma if sigma_w is None else sigma_w), **kw)

    @classmethod
    def uniform(cls, shape, size: int, size_w: Optional[int] = None, **kw) -> "Deblurring":
        return cls(shape, uniform_kernel(size), uniform_kernel(size if size_w is None else size_w), **kw)


class Colorization(Separable):
    """Grey from colour: y = the mean of the channels, [B, 1, H, W] (a per-pixel 1x3
    transform, so Vᵀ mixes channels with a 3x3 orthonormal matrix)."""

    def __init__(self, shape: Sequence[int]):
        if len(shape) != 3 or int(shape[0]) != 3:
            raise ValueError(f"shape must be (3, H, W) for colourisation, got {tuple(shape)}")
        super().__init__(shape, channel=torch.full((1, 3), 1.0 / 3, dtype=torch.float64))


def dct_matrix(n: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix of size n."""
    k = torch.arange(n, dtype=torch.float64)[:, None]
    j = torch.arange(n, dtype=torch.float64)[None, :]
    mat = torch.cos(torch.pi * (j + 0.5) * k / n) * (2.0 / n) ** 0.5
    mat[0] /= 2 ** 0.5
    return mat


def hadamard_matrix(n: int) -> torch.Tensor:
    """The orthonormal Walsh–Hadamard matrix (Sylvester order) of size n = 2^k."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"the Hadamard transform needs a power-of-2 size, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n ** 0.5


class CompressedSensing(Operator):
    """Keep a seeded random ``ratio`` of the coefficients of an orthonormal separable
    transform (``"dct"`` or ``"hadamard"`` along height and width, per channel).

    Vᵀ is the transform itself (no SVD needed), the singular values are the 0/1 mask of
    kept coefficients and y is transform-shaped, 0 at the dropped coefficients (U = I).
    """

    def __init__(self, shape: Sequence[int], ratio: float, seed: int = 0, transform: str = "dct"):
        super().__init__()
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
        if not 0.0 < float(ratio) <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio}")
        make = {"dct": dct_matrix, "hadamard": hadamard_matrix}.get(transform)
        if make is None:
            raise ValueError(f"transform must be 'dct' or 'hadamard', got {transform!r}")
        self.x_shape = tuple(int(s) for s in shape)
        self.y_shape = self.x_shape
        C, H, W = self.x_shape
        self._th, self._tw = make(H), make(W)
        n = C * H * W
        keep = max(1, round(float(ratio) * n))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
        mask = torch.zeros(n, dtype=torch.float64)
        mask[order[:keep]] = 1.0
        self._singulars = mask.view(C, H, W)
        self.ratio = keep / n

    def Vt(self, x):
        th = self._on(x, "th", lambda: self._th)
        tw = self._on(x, "tw", lambda: self._tw)
        return torch.matmul(torch.matmul(th, x), tw.T)

    def V(self, z):
        th = self._on(z, "th", lambda: self._th)
        tw = self._on(z, "tw", lambda: self._tw)
        return torch.matmul(torch.matmul(th.T, z), tw)

    def Ut(self, y):
        return y

    def U(self, z):
        return z


class DecomposableAdapter(Operator):
    """Wraps an object with deepinv's ``DecomposablePhysics`` interface — ``V``,
    ``V_adjoint``, ``U``, ``U_adjoint`` and ``mask``, with A(x) = U(mask · V_adjoint(x)) —
    after checking on random probes that V is orthonormal and square (image-shaped
    coefficients), U is an isometry on the measurements, and the mask is real and >= 0.
    What cannot be represented (thin decompositions, complex FFT layouts) is refused."""

    def __init__(self, physics, shape: Sequence[int], threshold: float = 1e-6, atol: float = 1e-5,
                 seed: int = 0):
        super().__init__()
        for name in ("V", "V_adjoint", "U", "U_adjoint", "mask"):
            if not hasattr(physics, name):
                raise TypeError(f"physics must have deepinv's DecomposablePhysics interface "
                                f"(V, V_adjoint, U, U_adjoint, mask); it has no {name}")
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
        self.physics = physics
        self.x_shape = tuple(int(s) for s in shape)
        gen = torch.Generator().manual_seed(seed)
        x = torch.randn((2, *self.x_shape), generator=gen, dtype=torch.float64)
        with torch.no_grad():
            z = physics.V_adjoint(x)
            if torch.is_complex(z):
                raise ValueError("physics has complex spectral coefficients (an FFT layout); "
                                 "only real orthonormal decompositions can be represented")
            if tuple(z.shape) != tuple(x.shape):
                raise ValueError(f"physics is a thin decomposition: V_adjoint maps {tuple(x.shape)} "
                                 f"to {tuple(z.shape)}; a square, image-shaped V is needed")
            if (physics.V(z) - x).abs().max() > atol or (physics.V_adjoint(physics.V(x)) - x).abs().max() > atol:
                raise ValueError("physics.V is not orthonormal (V Vᵀ x != x on a random probe)")
            mask = torch.as_tensor(physics.mask)
            if torch.is_complex(mask):
                raise ValueError("physics.mask is complex; real singular values are needed")
            mask = mask.detach().to(torch.float64).cpu()
            while mask.dim() > 3 and mask.shape[0] == 1:
                mask = mask[0]
            if bool((mask < 0).any()):
                raise ValueError("physics.mask has negative entries; singular values must be >= 0")
            try:
                torch.broadcast_shapes(mask.shape, self.x_shape)
            except RuntimeError:
                raise ValueError(f"physics.mask of shape {tuple(mask.shape)} does not broadcast to "
                                 f"the image shape {self.x_shape}") from None
            y = physics.U(mask * z)
            if (physics.U(physics.U_adjoint(y)) - y).abs().max() > atol:
                raise ValueError("physics.U is not an isometry on the measurements")
        self.y_shape = tuple(y.shape[1:])
        cut = max(threshold, NUMERICAL_ZERO) * float(mask.max()) if mask.numel() else 0.0
        self._singulars_exact = mask
        self._singulars = torch.where(mask > cut, mask, torch.zeros_like(mask))

    def Vt(self, x):
        return self.physics.V_adjoint(x)

    def V(self, z):
        return self.physics.V(z)

    def Ut(self, y):
        return self.physics.U_adjoint(y)

    def U(self, z):
        return self.physics.U(z)


def from_deepinv(physics, shape: Sequence[int], **kw) -> DecomposableAdapter:
    """A deqir_fast operator from a deepinv ``DecomposablePhysics`` (``pip install
    'deqir_fast[deepinv]'``); any object with the same interface is accepted too (the
    adapter needs only the interface, so deepinv itself is never imported)."""
    return DecomposableAdapter(physics, shape, **kw)
