"""deqir_fast: diffusion restoration (DDIM, DDRM, DDNM) solved as one parallel
fixed-point system (DeqIR, Cao et al. CVPR 2024), with serial reference samplers."""
from . import models, operators, tasks, testing
from .optimize import InitOptimization, optimize_init
from .api import SolveResult, backward, sample_serial, solve
from .chains import DDIM, DDNM, DDRM, Chain
from .schedules import Schedule, timesteps

__version__ = "0.1.0"

__all__ = ["Chain", "DDIM", "DDNM", "DDRM", "InitOptimization", "Schedule", "SolveResult",
           "models", "operators", "optimize_init", "tasks",
           "backward", "sample_serial", "solve", "testing", "timesteps"]
