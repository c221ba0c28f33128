"""Time of Vᵀ and V per operator next to one call of the bundled model on the same batch.

    OMP_NUM_THREADS=1 python bench/operators.py                 # [100,3,64,64], [25,3,256,256]
    OMP_NUM_THREADS=1 python bench/operators.py --shapes 8x3x32x32 --repeats 5

The solver applies Vᵀ and V to the whole stacked chain every round, so they must stay
small next to the denoiser. Medians over ``--repeats``; prints a markdown table.
"""
from __future__ import annotations

import argparse

import torch
from timing import median_time

from deqir_fast.tasks import TASKS, build_operator


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="100x3x64x64,25x3x256x256")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tasks", default=",".join(sorted(TASKS)))
    args = p.parse_args()
    from deqir_fast.models import bundled_model
    model = bundled_model()
    print(f"torch threads: {torch.get_num_threads()}")
    print("| batch shape | model call s | operator | Vt s | V s | (Vt+V)/model |")
    print("|---|---|---|---|---|---|")
    for spec in args.shapes.split(","):
        shape = tuple(int(v) for v in spec.split("x"))
        x = torch.randn(shape)
        t = torch.full((shape[0],), 500, dtype=torch.long)
        with torch.no_grad():
            t_model = median_time(lambda: model(x, t), max(1, args.repeats // 2))
        for name in args.tasks.split(","):
            op = build_operator(name, shape[1:])
            z = op.Vt(x)
            t_vt = median_time(lambda: op.Vt(x), args.repeats)
            t_v = median_time(lambda: op.V(z), args.repeats)
            print(f"| {spec} | {t_model:.3f} | {name} | {t_vt:.4f} | {t_v:.4f} | "
                  f"{(t_vt + t_v) / t_model:.1%} |", flush=True)


if __name__ == "__main__":
    main()
