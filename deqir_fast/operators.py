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

    # -- derived maps ------------------------------------------------------------
    def A(self, x: torch.Tensor) -> torch.Tensor:
        return self.U(self.singulars_as(x) * self.Vt(x))

    def At(self, y: torch.Tensor) -> torch.Tensor:
        z = self.Ut(y)
        return self.V(self.singulars_as(z) * z)

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


class Masked(Operator):
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

    def Vt(self, x):
        return x

    def V(self, z):
        return z

    def Ut(self, y):
        return y

    def U(self, z):
        return z


class Inpainting(Masked):
    """Keep the pixels where ``mask`` is 1. ``mask``: [H, W] (all channels) or [C, H, W]."""


class Identity(Operator):
    """Denoising: A = I, for images of any shape (or of ``shape`` = (C, H, W) if given)."""

    def __init__(self, shape: Optional[Sequence[int]] = None):
        super().__init__()
        self.x_shape = (None, None, None) if shape is None else tuple(int(s) for s in shape)
        self.y_shape = self.x_shape
        self._singulars = torch.ones(1, 1, 1, dtype=torch.float64)

    def Vt(self, x):
        return x

    def V(self, z):
        return z

    def Ut(self, y):
        return y

    def U(self, z):
        return z


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
    ``threshold`` (relative to the largest) count as 0: the null space.
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
        cut = self.threshold * float(s.max()) if s.numel() else 0.0
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

    def __init__(self, factor: int, shape: Sequence[int], threshold: float = 1e-6):
        if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
            raise ValueError(f"factor must be a positive int, got {factor!r}")
        if len(shape) != 3:
            raise ValueError(f"shape must be (C, H, W), got {tuple(shape)}")
        _, h, w = (int(s) for s in shape)
        super().__init__(shape, height=block_average_matrix(h, factor),
                         width=block_average_matrix(w, factor), threshold=threshold)
        self.factor = factor
