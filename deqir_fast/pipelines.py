"""Parallel drop-in replacements for diffusers' ``DDIMPipeline`` and ``DDPMPipeline``,
and a restoration pipeline (DDRM / DDNM) on a pipeline's UNet. Needs diffusers.

Same call signature and output type as the serial pipelines (``generator``,
``num_inference_steps``, ``eta``, ``output_type``, ``return_dict``; an
``ImagePipelineOutput`` whose ``images`` are the images), plus keyword-only solver
settings. With the same generator they draw the same x_T and step noise, in the same
order, as the serial pipeline, so with ``tol=0`` they return its images (to float
rounding) after at most ``num_inference_steps`` rounds; at the default ``tol`` the
images are within about one 8-bit grey level of them, in far fewer rounds. The output
also reports ``rounds``, ``nfe`` and ``converged``.

    pipe = DDIMPipeline.from_pretrained(folder)                      # before
    pipe = ParallelDDIMPipeline.from_pretrained(folder)              # after
    images = pipe(generator=torch.Generator().manual_seed(0), num_inference_steps=50).images
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from diffusers import DDIMPipeline, DDPMPipeline, DiffusionPipeline, ImagePipelineOutput
from diffusers.utils.torch_utils import randn_tensor

from . import api
from .chains import DDNM, DDRM, Chain
from .diffusers_compat import (_check_zero_snr_timesteps, _read, chain_from_diffusers,
                               draw_noise, schedule_from_diffusers, timesteps_from_config)
from .models import EpsModel
from .operators import Operator


@dataclass
class ParallelImagePipelineOutput(ImagePipelineOutput):
    """``ImagePipelineOutput`` plus what the parallel solve took: ``rounds`` (parallel
    model calls, S for a serial run), ``nfe`` (step evaluations) and ``converged``."""
    rounds: Optional[int] = None
    nfe: Optional[int] = None
    converged: Optional[bool] = None


def _randn(shape, generator, device, dtype):
    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)


def _image_shape(unet, batch_size: int):
    size = unet.config.sample_size
    if isinstance(size, int):
        return (batch_size, unet.config.in_channels, size, size)
    return (batch_size, unet.config.in_channels, *size)


def _run(pipe, chain: Chain, shape, generator, output_type, return_dict, serial, max_batch,
         solve_kwargs):
    """Draw as diffusers does, solve (or run serially), post-process as diffusers does."""
    unet = pipe.unet
    device, dtype = pipe._execution_device, unet.dtype
    if isinstance(generator, list) and len(generator) != shape[0]:
        raise ValueError(f"You have passed a list of generators of length {len(generator)}, but "
                         f"requested an effective batch size of {shape[0]}. Make sure the batch "
                         f"size matches the length of the generators.")
    x_T, noise = draw_noise(chain, shape, generator, device, dtype, randn=_randn)
    model = EpsModel(unet, max_batch=max_batch,
                     prediction_type=getattr(chain, "prediction_type", "epsilon"),
                     schedule=chain.schedule,
                     model_timesteps=getattr(chain, "model_timesteps", None))
    S = chain.num_steps
    if serial:
        image = api.sample_serial(model, chain, x_T, noise=noise)
        rounds, nfe, converged, result = S, S, True, None
    else:
        result = api.solve(model, chain, x_T, noise=noise, **solve_kwargs)
        image = result.x0
        rounds, nfe, converged = result.iterations, result.nfe, result.converged
    pipe.last_result = result
    image = (image * chain.output_scale).to(dtype)
    image = (image / 2 + 0.5).clamp(0, 1)
    if output_type != "pt":
        image = image.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            image = pipe.numpy_to_pil(image)
    pipe.maybe_free_model_hooks()
    if not return_dict:
        return (image,)
    return ParallelImagePipelineOutput(images=image, rounds=rounds, nfe=nfe, converged=converged)


class ParallelDDIMPipeline(DDIMPipeline):
    """``DDIMPipeline`` solved in parallel. Like the serial pipeline it converts its
    scheduler to a ``DDIMScheduler``; build that with ``clip_sample=False`` (diffusers
    clips by default, which the parallel chain cannot reproduce: it raises)."""

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator=None, eta: float = 0.0,
                 num_inference_steps: int = 50, use_clipped_model_output: Optional[bool] = None,
                 output_type: Optional[str] = "pil", return_dict: bool = True, *,
                 tol: float = api.DEFAULT_TOL, serial: bool = False,
                 max_batch: Optional[int] = None, **solve_kwargs):
        """As ``DDIMPipeline.__call__`` (``use_clipped_model_output`` has no effect
        without clipping, as in diffusers). Keyword-only: ``tol`` and any other
        ``deqir_fast.solve`` setting (``solver``, ``max_iter``, ``window``, ``init``);
        ``serial=True`` runs the serial sampler on the same draws; ``max_batch`` splits
        the batched UNet call. ``self.last_result`` keeps the ``SolveResult``."""
        chain = chain_from_diffusers(self.scheduler, num_inference_steps, eta)
        return _run(self, chain, _image_shape(self.unet, batch_size), generator, output_type,
                    return_dict, serial, max_batch, dict(solve_kwargs, tol=tol))


class ParallelDDPMPipeline(DDPMPipeline):
    """``DDPMPipeline`` solved in parallel (ancestral DDPM with the scheduler's
    ``variance_type``: "fixed_small", "fixed_small_log" or "fixed_large"; a
    ``DDIMScheduler`` here steps as in the serial pipeline, with eta = 0; a
    ``DPMSolverMultistepScheduler`` runs DPM-Solver++(2M)). The Euler schedulers are
    refused: ``DDPMPipeline`` calls neither ``scale_model_input`` nor
    ``init_noise_sigma``, which they need, so the serial pipeline does not run Euler."""

    @torch.no_grad()
    def __call__(self, batch_size: int = 1, generator=None, num_inference_steps: int = 1000,
                 output_type: Optional[str] = "pil", return_dict: bool = True, *,
                 tol: float = api.DEFAULT_TOL, serial: bool = False,
                 max_batch: Optional[int] = None, **solve_kwargs):
        """As ``DDPMPipeline.__call__``; keyword-only solver settings as for
        ``ParallelDDIMPipeline``."""
        kind, _ = _read(self.scheduler)
        if kind in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler"):
            raise ValueError(f"DDPMPipeline with a {kind} feeds the UNet the unscaled sample "
                             f"(it calls neither scale_model_input nor init_noise_sigma), so "
                             f"the serial pipeline it replaces does not run Euler; solve "
                             f"dq.chain_from_diffusers(scheduler, steps) with "
                             f"dq.models.eps_model(unet, scheduler, chain=chain) instead")
        chain = chain_from_diffusers(self.scheduler, num_inference_steps)
        return _run(self, chain, _image_shape(self.unet, batch_size), generator, output_type,
                    return_dict, serial, max_batch, dict(solve_kwargs, tol=tol))


class ParallelRestorationPipeline(DiffusionPipeline):
    """Image restoration (DDRM or DDNM) with a diffusers pipeline's UNet and scheduler.

    The scheduler gives the schedule (ᾱ), the timestep spacing (``timestep_spacing``,
    ``steps_offset``) and ``prediction_type``; the sampler is deqir_fast's own DDRM or
    DDNM chain (the scheduler's ``step``, and so its clipping, is not used). x_T and
    the step noise are standard-normal draws in the operator's spectral basis, x_T
    first, then one [B, C, H, W] draw per step when the chain is stochastic.

        pipe = ParallelRestorationPipeline(unet=ddpm.unet, scheduler=ddpm.scheduler)
        out = pipe(y, operator=ops.Inpainting(mask), sampler="ddnm",
                   generator=torch.Generator().manual_seed(0), num_inference_steps=100)
    """

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    def make_chain(self, y: torch.Tensor, operator: Operator, sampler: str = "ddrm",
                   sigma_y: float = 0.0, eta: Optional[float] = None, eta_b: float = 1.0,
                   num_inference_steps: int = 50) -> Chain:
        """The DDRM / DDNM chain the pipeline solves (eta defaults: DDRM 0.85, DDNM 0)."""
        _, cfg = _read(self.scheduler)
        schedule = schedule_from_diffusers(self.scheduler)
        ts = timesteps_from_config(cfg, num_inference_steps)
        _check_zero_snr_timesteps(cfg, ts)             # DDRM/DDNM start from ᾱ(t_0) too
        ts = torch.from_numpy(ts)
        if sampler == "ddrm":
            chain = DDRM(schedule, ts, operator=operator, y=y, sigma_y=sigma_y,
                         eta=0.85 if eta is None else eta, eta_b=eta_b)
        elif sampler == "ddnm":
            chain = DDNM(schedule, ts, operator=operator, y=y, sigma_y=sigma_y,
                         eta=0.0 if eta is None else eta)
        else:
            raise ValueError(f"sampler must be 'ddrm' or 'ddnm', got {sampler!r}")
        chain.prediction_type = cfg["prediction_type"]
        return chain

    @torch.no_grad()
    def __call__(self, y: torch.Tensor, operator: Operator, sampler: str = "ddrm",
                 sigma_y: float = 0.0, eta: Optional[float] = None, eta_b: float = 1.0,
                 generator=None, num_inference_steps: int = 50,
                 output_type: Optional[str] = "pil", return_dict: bool = True, *,
                 tol: float = api.DEFAULT_TOL, serial: bool = False,
                 max_batch: Optional[int] = None, **solve_kwargs):
        """Restore the measurement ``y`` = operator.A(x) (+ noise of std ``sigma_y``);
        images and outputs as in ``ParallelDDIMPipeline``."""
        if not isinstance(y, torch.Tensor) or y.dim() != 4:
            raise ValueError(f"y must be a [B, ...] measurement tensor of 4 dimensions, got "
                             f"{getattr(y, 'shape', type(y).__name__)}")
        y = y.to(device=self._execution_device, dtype=torch.float32)
        chain = self.make_chain(y, operator, sampler, sigma_y, eta, eta_b, num_inference_steps)
        return _run(self, chain, _image_shape(self.unet, y.shape[0]), generator, output_type,
                    return_dict, serial, max_batch, dict(solve_kwargs, tol=tol))
