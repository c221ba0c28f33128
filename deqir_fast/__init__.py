"""deqir_fast: diffusion restoration (DDIM, DDRM, DDNM) solved as one parallel
fixed-point system (DeqIR, Cao et al. CVPR 2024), with serial reference samplers."""
import importlib
import importlib.util

__version__ = "0.1.0"

# The public names, loaded on first use (PEP 562): importing the package costs nothing,
# so `deqir-fast --version` and `--help` do not wait seconds for torch, and the drop-in
# pipelines import diffusers (an optional extra) only when asked for.
_ATTRIBUTES = {
    "SolveResult": ".api", "backward": ".api", "sample_serial": ".api", "solve": ".api",
    "SolveOptions": ".solvers", "Planner": ".solvers",
    "InitOptimization": ".optimize", "optimize_init": ".optimize",
    "Chain": ".chains", "DDIM": ".chains", "DDNM": ".chains", "DDRM": ".chains",
    "Euler": ".chains", "EulerAncestral": ".chains", "DPMSolverPP": ".chains",
    "sample_euler": ".k_diffusion", "sample_euler_ancestral": ".k_diffusion",
    "sample_dpmpp_2m": ".k_diffusion",
    "Schedule": ".schedules", "timesteps": ".schedules",
    "DDPM": ".diffusers_compat", "chain_from_diffusers": ".diffusers_compat",
    "schedule_from_diffusers": ".diffusers_compat", "sample_deq": ".k_diffusion",
    "ParallelDDIMPipeline": ".pipelines", "ParallelDDPMPipeline": ".pipelines",
    "ParallelRestorationPipeline": ".pipelines",
}


def __getattr__(name):
    module = _ATTRIBUTES.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module, __name__), name)
        globals()[name] = value                  # later look-ups skip this function
        return value
    # Submodules (dq.operators, dq.api, ...) load on first use, as an import would.
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_ATTRIBUTES) | set(__all__))


__all__ = ["Chain", "DDIM", "DDNM", "DDRM", "DPMSolverPP", "Euler", "EulerAncestral",
           "InitOptimization", "Planner", "Schedule",
           "SolveOptions",
           "SolveResult",
           "models", "operators", "optimize_init", "tasks",
           "backward", "sample_serial", "solve", "testing", "timesteps",
           "DDPM", "chain_from_diffusers", "diffusers_compat", "sample_deq",
           "sample_dpmpp_2m", "sample_euler", "sample_euler_ancestral",
           "schedule_from_diffusers"]
