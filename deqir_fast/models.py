"""Model adapters: anything callable as ``eps = model(x, t)`` works; these wrap
diffusers networks and the bundled model. diffusers is imported lazily, here only."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import torch

from .diffusers_compat import (PREDICTION_TYPES, SIGMA_SCHEDULERS, _read, schedule_from_diffusers,
                               to_eps)

ASSETS = Path(__file__).resolve().parent / "assets"


class EpsModel(torch.nn.Module):
    """Wraps a network into ``eps = model(x, t)``.

    - a diffusers output (``.sample``) is unwrapped;
    - learned-variance outputs (2C channels for C-channel input, as the guided-diffusion
      checkpoints used by DDRM/DDNM/DeqIR give) keep their eps half;
    - the network runs in its own dtype; x is cast in and eps cast back to x's dtype,
      so a half-precision network works under a float32 solver state;
    - ``max_batch`` splits a large call (a whole 100-step chain) into micro-batches;
    - ``prediction_type`` "sample" (x0) or "v_prediction" outputs are turned into eps
      with the ``schedule``'s ᾱ_t (eps = (x - sqrt(ᾱ) x0)/sqrt(1-ᾱ), or
      sqrt(ᾱ) v + sqrt(1-ᾱ) x), so every chain sees an eps model.
    ``schedule`` (a ``Schedule`` or None) is also the model's own schedule, as read by
    ``load_unet`` from a scheduler config next to the weights.
    ``model_timesteps`` (a tensor, or None): the network is called with
    ``model_timesteps[t]`` instead of t (a σ-space chain's timestep indices are not the
    network's timesteps: ``chain_from_diffusers`` sets ``chain.model_timesteps``).
    """

    def __init__(self, network: torch.nn.Module, max_batch: Optional[int] = None,
                 prediction_type: str = "epsilon", schedule=None,
                 model_timesteps: Optional[torch.Tensor] = None):
        super().__init__()
        if max_batch is not None and (isinstance(max_batch, bool) or not isinstance(max_batch, int)
                                      or max_batch < 1):
            raise ValueError(f"max_batch must be a positive int or None, got {max_batch!r}")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, "
                             f"got {prediction_type!r}")
        if prediction_type != "epsilon" and schedule is None:
            raise ValueError(f"prediction_type={prediction_type!r} needs the schedule (ᾱ_t) "
                             f"to turn the network's output into eps")
        self.network = network
        self.max_batch = max_batch
        self.prediction_type = prediction_type
        # The model's own schedule (a deqir_fast.Schedule) when known, else None.
        self.schedule = schedule
        self.scheduler_config = None
        if model_timesteps is not None and not isinstance(model_timesteps, torch.Tensor):
            raise TypeError(f"model_timesteps must be a tensor or None, got "
                            f"{type(model_timesteps).__name__}")
        self.model_timesteps = model_timesteps

    def _dtype(self) -> Optional[torch.dtype]:
        for p in self.network.parameters():
            return p.dtype
        return None

    def _one(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        dtype = self._dtype() or x.dtype
        t_net = t if self.model_timesteps is None else \
            self.model_timesteps.to(t.device)[t.long()]
        out = self.network(x.to(dtype), t_net)
        if hasattr(out, "sample") and not isinstance(out, torch.Tensor):
            out = out.sample
        if out.dim() == 4 and out.shape[1] == 2 * x.shape[1]:
            out = out[:, : x.shape[1]]
        out = out.to(x.dtype)
        if self.prediction_type != "epsilon":
            out = to_eps(out, x, t, self.schedule, self.prediction_type)
        return out

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.max_batch is None or x.shape[0] <= self.max_batch:
            return self._one(x, t)
        return torch.cat([self._one(xc, tc) for xc, tc in
                          zip(x.split(self.max_batch), t.split(self.max_batch))])


def eps_model(network, scheduler, max_batch: Optional[int] = None, chain=None) -> EpsModel:
    """``EpsModel(network)`` reading a diffusers scheduler's (or config's)
    ``prediction_type`` (eps from "sample" or "v_prediction" outputs) and schedule.

    For the σ-space schedulers (Euler, Euler-ancestral, DPM-Solver++) pass the ``chain``
    of ``chain_from_diffusers(scheduler, steps)``: the network then runs at the
    scheduler's own timesteps and its output is read with each step's σ."""
    kind, cfg = _read(scheduler)
    if kind in SIGMA_SCHEDULERS:
        if chain is None or getattr(chain, "model_timesteps", None) is None:
            raise ValueError(f"eps_model for a {kind} needs chain=chain_from_diffusers("
                             f"scheduler, steps): the network's timesteps and each step's "
                             f"σ come from the chain")
        return EpsModel(network, max_batch=max_batch, prediction_type=cfg["prediction_type"],
                        schedule=chain.schedule, model_timesteps=chain.model_timesteps)
    if chain is not None:
        raise ValueError(f"chain= is for the σ-space schedulers {SIGMA_SCHEDULERS}, not {kind}")
    return EpsModel(network, max_batch=max_batch, prediction_type=cfg["prediction_type"],
                    schedule=schedule_from_diffusers(scheduler))


def load_unet(folder: Union[str, Path], max_batch: Optional[int] = None,
              dtype: Optional[torch.dtype] = None, device=None) -> EpsModel:
    """A diffusers ``UNet2DModel`` from a local folder (config.json + weights).

    When a scheduler config comes with it (``scheduler_config.json`` in the folder, in
    its ``scheduler/`` subfolder, or in ``../scheduler/`` as in a saved pipeline), the
    model's schedule is read from it: ``model.schedule`` is that ``Schedule`` (else
    None), ``model.scheduler_config`` the config dict (else None), and a "sample" or
    "v_prediction" ``prediction_type`` is turned into eps."""
    try:
        from diffusers import UNet2DModel
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("loading a UNet needs diffusers: pip install 'deqir_fast[demo]'") from exc
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model folder {folder} has no config.json (a diffusers model folder "
                         f"is expected)")
    schedule, config, prediction_type = None, None, "epsilon"
    config_path = find_scheduler_config(folder)
    if config_path is not None:
        schedule, config, prediction_type = read_scheduler_config(config_path)
    # low_cpu_mem_usage=False: the default asks for `accelerate` and warns without it.
    unet = UNet2DModel.from_pretrained(str(folder), low_cpu_mem_usage=False)
    unet.eval().requires_grad_(False)
    if dtype is not None or device is not None:
        unet = unet.to(device=device, dtype=dtype)
    model = EpsModel(unet, max_batch=max_batch, prediction_type=prediction_type, schedule=schedule)
    model.scheduler_config = config
    return model


def find_scheduler_config(folder: Union[str, Path]) -> Optional[Path]:
    """The scheduler config that comes with a model folder, or None."""
    folder = Path(folder)
    for path in (folder / "scheduler_config.json", folder / "scheduler" / "scheduler_config.json",
                 folder.parent / "scheduler" / "scheduler_config.json"):
        if path.is_file():
            return path
    return None


def read_scheduler_config(path: Union[str, Path]):
    """(Schedule, config dict, prediction_type) from a diffusers scheduler_config.json."""
    import json
    path = Path(path)
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the scheduler config {path}: {exc}") from None
    if not isinstance(config, dict):
        raise ValueError(f"the scheduler config {path} is not a JSON object")
    try:
        schedule = schedule_from_diffusers(config)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"the scheduler config {path}: {exc}") from None
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"the scheduler config {path}: prediction_type {prediction_type!r} is "
                         f"not supported (one of {PREDICTION_TYPES})")
    return schedule, config, prediction_type


def bundled_model(max_batch: Optional[int] = None) -> EpsModel:
    """The small UNet shipped with the package (3x32x32, trained by
    scripts/train_bundled_model.py on coloured digits from scikit-learn)."""
    return load_unet(ASSETS / "model", max_batch=max_batch)


def heldout_images() -> torch.Tensor:
    """The bundled held-out evaluation crops, [N, 3, 32, 32] in [-1, 1]."""
    import numpy as np
    return torch.from_numpy(np.load(ASSETS / "heldout.npz")["images"])
