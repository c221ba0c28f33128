"""Model adapters: anything callable as ``eps = model(x, t)`` works; these wrap
diffusers networks and the bundled model. diffusers is imported lazily, here only."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

ASSETS = Path(__file__).resolve().parent / "assets"


class EpsModel(torch.nn.Module):
    """Wraps a network into ``eps = model(x, t)``.

    - a diffusers output (``.sample``) is unwrapped;
    - learned-variance outputs (2C channels for C-channel input, as the guided-diffusion
      checkpoints used by DDRM/DDNM/DeqIR give) keep their eps half;
    - the network runs in its own dtype; x is cast in and eps cast back to x's dtype,
      so a half-precision network works under a float32 solver state;
    - ``max_batch`` splits a large call (a whole 100-step chain) into micro-batches.
    """

    def __init__(self, network: torch.nn.Module, max_batch: Optional[int] = None):
        super().__init__()
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                      or max_batch < 1):
            raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
        self.network = network
        self.max_batch = max_batch

    def _dtype(self) -> Optional[torch.dtype]:
        for p in self.network.parameters():
            return p.dtype
        return None

    def _one(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self._dtype() or x.dtype
        out = self.network(x.to(dtype), t)
        if hasattr(out, "sample") and not isinstance(out, torch.Tensor):
            out = out.sample
        if out.dim() == 4 and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        return out.to(x.dtype)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.max_batch is None or x.shape[0] <= self.max_batch:
            return self._one(x, t)
        return torch.cat([self._one(xc, tc) for xc, tc in
                          zip(x.split(self.max_batch), t.split(self.max_batch))])


def load_unet(folder: Union[str, Path], max_batch: Optional[int] = None,
              dtype: Optional[torch.dtype] = None, device=None) -> EpsModel:
    """A diffusers ``UNet2DModel`` from a local folder (config.json + weights)."""
    try:
        from diffusers import UNet2DModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("loading a UNet needs diffusers: pip install 'deqir_fast[demo]'") from exc
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model folder {folder} has no config.json (a diffusers model folder "
                         f"is expected)")
    # low_cpu_mem_usage=False: the default asks for `accelerate` and warns without it.
    unet = UNet2DModel.from_pretrained(str(folder), low_cpu_mem_usage=False)
    unet.eval().requires_grad_(False)
    if dtype is not None or device is not None:
        unet = unet.to(device=device, dtype=dtype)
    return EpsModel(unet, max_batch=max_batch)


def bundled_model(max_batch: Optional[int] = None) -> EpsModel:
    """The small UNet shipped with the package (3x32x32, trained by
    scripts/train_bundled_model.py on scikit-image photographs)."""
    return load_unet(ASSETS / "model", max_batch=max_batch)


def heldout_images() -> torch.Tensor:
    """The bundled held-out evaluation crops, [N, 3, 32, 32] in [-1, 1]."""
    import numpy as np
    return torch.from_numpy(np.load(ASSETS / "heldout.npz")["images"])
