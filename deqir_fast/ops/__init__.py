"""The hot operations besides the denoiser, each with a pure-PyTorch reference.

- ``affine_step`` / ``affine_scan``: the chain's per-step update and its scan over the
  step axis (the "analytical solution" of the chain, computed as the serial sampler
  computes it, never through cumulative products); a Triton kernel on CUDA.
- ``anderson_mix``: Gram matrices of the residual history, the small bordered solves
  and the mix, per (step, batch item).
- ``step_residuals``: the per-step max-abs residual.
"""
from .anderson import anderson_mix
from .scan import affine_scan, affine_scan_reference, affine_step, scan_backend, step_residuals

__all__ = ["affine_scan", "affine_scan_reference", "affine_step", "anderson_mix",
           "scan_backend", "step_residuals"]
