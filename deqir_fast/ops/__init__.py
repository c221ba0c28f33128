"""The hot operations besides the denoiser, each with a pure-PyTorch reference beside its
kernels (docs/design.md §5).

- ``fused_round``: one solver round of DDIM / DDRM / DDNM after the model call: the
  linearised scan with P, Q, R computed per element in-kernel, and the per-step
  residual, in one pass (``fused_round.py``; kernels: C++/OpenMP and CUDA C++ in
  ``kernels/``, Triton in ``triton_round.py``);
- ``affine_step`` / ``affine_scan``: the generic per-step update and scan over
  materialised coefficients (the adjoint system, other chains; a Triton kernel on CUDA);
- ``anderson_mix`` / ``AndersonRing``: Anderson mixing, the list-based reference and the
  preallocated ring of history with incremental Gram rows (native Gram and mix kernels);
- ``step_residuals``: the per-step max-abs residual;
- ``backends``: which backend runs where (``DEQIR_FAST_BACKEND``, read once).
"""
# Ops that loop over a window in chunks of steps keep each chunk to this many values
# (float32: 16 MB temporaries), so their peak memory does not grow with the window.
CHUNK_ELEMENTS = 1 << 22

from .anderson import AndersonRing, anderson_mix  # noqa: E402
from .fused_round import KernelSpec, fused_round, fused_round_reference  # noqa: E402
from .scan import affine_scan, affine_scan_reference, affine_step, scan_backend, step_residuals  # noqa: E402,E501

__all__ = ["CHUNK_ELEMENTS", "AndersonRing", "KernelSpec", "affine_scan", "affine_scan_reference", "affine_step",
           "anderson_mix", "fused_round", "fused_round_reference", "scan_backend",
           "step_residuals"]
