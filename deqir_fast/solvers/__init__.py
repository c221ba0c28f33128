"""Fixed-point solvers for the stacked chain (docs/design.md §3).

- ``loop``: the one solver loop (``FixedPointLoop``, ``fixed_point_solve``): the policy
  (freeze and stop rule, window, guards, serial shadow, callbacks, ``converged``);
- ``engines``: where rounds run on one process (``EagerEngine``, ``ReadbackEngine`` for
  ``check_every`` and CUDA graphs; ``distributed.ShardedEngine`` across processes);
- ``rules``: the update rules, a registry (``register_solver``) valid in every engine;
- ``policy``: the rules of the loop that every engine shares, and ``SolverStats``;
- ``options``: ``SolveOptions``, the expert knobs with their one set of defaults;
- ``planner``: ``window="auto"``, the throughput planner (``Planner``) that picks the
  window per round from the model's measured cost curve, or the serial sampler.
"""
from .loop import FixedPointLoop, fixed_point_solve
from .planner import CostCurve, PlanStats, Planner, clear_cost_curves
from .options import DEFAULT_GRAD_TOL, DEFAULT_TOL, FREEZE_RATIO, SolveOptions
from .policy import (GUARD_GROWTH, SerialShadow, SolverStats, begin_exact_restart, enter_steps,
                     freeze_count, freeze_levels, guard_tripped, note_deviation, record_round,
                     shadow_applies, steps_to_freeze, switch_off_jacobian)
from .rules import (SOLVERS, Anderson, Picard, RoundContext, TriangularAnderson, Update,
                    check_solver, make_rule, register_solver, takes_context)

__all__ = ["FixedPointLoop", "fixed_point_solve", "CostCurve", "PlanStats", "Planner",
           "clear_cost_curves", "SolveOptions", "DEFAULT_GRAD_TOL", "DEFAULT_TOL",
           "FREEZE_RATIO", "GUARD_GROWTH", "SerialShadow", "SolverStats", "begin_exact_restart",
           "enter_steps", "freeze_count", "freeze_levels", "guard_tripped", "note_deviation",
           "record_round", "shadow_applies", "steps_to_freeze", "switch_off_jacobian",
           "SOLVERS", "Anderson", "Picard", "RoundContext", "TriangularAnderson", "Update",
           "check_solver", "make_rule", "register_solver", "takes_context"]
