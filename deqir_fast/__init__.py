"""deqir_fast: diffusion restoration (DDIM, DDRM, DDNM) solved as one parallel
fixed-point system (DeqIR, Cao et al. CVPR 2024), with serial reference samplers."""
from . import models, operators, tasks, testing
from .optimize import InitOptimization, optimize_init
from .api import SolveResult, backward, sample_serial, solve
from .chains import DDIM, DDNM, DDRM, Chain
from .schedules import Schedule, timesteps
from . import diffusers_compat
from .diffusers_compat import DDPM
from .k_diffusion import sample_deq

_PIPELINES = ("ParallelDDIMPipeline", "ParallelDDPMPipeline", "ParallelRestorationPipeline")


def __getattr__(name):
    # The drop-in pipelines import diffusers (an optional extra): load them on first use.
    if name in _PIPELINES or name == "pipelines":
        import importlib
        pipelines = importlib.import_module(".pipelines", __name__)
        return pipelines if name == "pipelines" else getattr(pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = ["Chain", "DDIM", "DDNM", "DDRM", "InitOptimization", "Schedule", "SolveResult",
           "models", "operators", "optimize_init", "tasks",
           "backward", "sample_serial", "solve", "testing", "timesteps",
           "DDPM", "diffusers_compat", "sample_deq"]
