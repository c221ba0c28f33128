"""The loop users already run, timed against ours: diffusers' ``DDIMScheduler`` stepping
the network against ``sample_serial`` on the chain that steps as that scheduler does, same
network and noise, in turns (DDIM only)."""
from __future__ import annotations

import statistics

import torch

import deqir_fast as dq

from ..diffusers_compat import chain_from_diffusers, draw_noise
from ..system import ieee_float32
from .config import GREY, BenchConfig
from .models import BenchModel
from .timing import load_1m, take_turns, timed

def diffusers_scheduler(bm: BenchModel):
    """A DDIMScheduler for the model: its own config (clip_sample and thresholding off,
    as the affine chain requires), else diffusers' defaults (linear betas)."""
    from diffusers import DDIMScheduler
    config = dict(bm.scheduler_config or {})
    for key in ("_class_name", "_diffusers_version"):
        config.pop(key, None)
    config.update(clip_sample=False, thresholding=False)
    return DDIMScheduler.from_config(config)


def run_loops(bm: BenchModel, cfg: BenchConfig, S: int, B: int, device: torch.device,
              progress) -> dict:
    """diffusers' DDIMScheduler loop against our serial sampler on the chain that steps as
    the scheduler does (``chain_from_diffusers``), same network, same noise, both in IEEE
    float32 on CUDA."""
    scheduler = diffusers_scheduler(bm)
    chain = chain_from_diffusers(scheduler, S, eta=0.0)
    x_T, noise = draw_noise(chain, (B, *bm.shape), torch.Generator().manual_seed(cfg.seed + 3))
    x_T, noise = x_T.to(device), noise.to(device)
    network = bm.network if bm.network is not None else bm.model

    def diffusers_loop(net):
        scheduler.set_timesteps(S)
        image = x_T.clone()
        for t in scheduler.timesteps:
            # the same float32 arithmetic as ours (no TF32 on CUDA: system.ieee_float32)
            with ieee_float32(device):
                out = net(image, t.to(device))
            eps = out.sample if hasattr(out, "sample") and not isinstance(out, torch.Tensor) else out
            image = scheduler.step(eps, t, image, eta=0.0).prev_sample
        return image

    def ours(model):
        return dq.sample_serial(model, chain, x_T, noise=noise)

    methods = {"diffusers": lambda: timed(diffusers_loop, network, device, False),
               "ours": lambda: timed(ours, bm.model, device, False)}
    load = load_1m()
    warm, runs = take_turns(methods, cfg.repeats, progress, f"DDIM loops S={S} B={B}")
    first = {name: run.out for name, run in warm.items()}
    names = list(methods)
    diff = float((first["ours"] - first["diffusers"]).abs().max())
    med = {n: statistics.median(t.seconds for t in runs[n]) if runs[n] else None for n in names}
    model_s = {n: statistics.median(t.model_s for t in runs[n]) if runs[n] else None for n in names}
    over = {n: statistics.median(t.seconds - t.model_s for t in runs[n]) if runs[n] else None
            for n in names}
    return {"model": bm.name, "steps": S, "batch": B, "repeats": cfg.repeats,
            "diffusers_s": med["diffusers"], "ours_s": med["ours"],
            "ratio": (med["ours"] / med["diffusers"]) if runs["ours"] else None,
            "diffusers_runs": [t.seconds for t in runs["diffusers"]],
            "ours_runs": [t.seconds for t in runs["ours"]],
            "model_s_diffusers": model_s["diffusers"], "model_s_ours": model_s["ours"],
            "overhead_s_diffusers": over["diffusers"], "overhead_s_ours": over["ours"],
            "max_abs_diff": diff, "parity_ok": bool(diff <= GREY), "load_1m": load}
