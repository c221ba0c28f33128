"""Shard a solve's steps across processes with torch.distributed (issue #14).

    torchrun --nproc-per-node 2 examples/sharded_solve.py --solver anderson
    torchrun --nproc-per-node 4 examples/sharded_solve.py --device cuda   # nccl, GPU per rank

CPU processes with gloo; with ``--device cuda`` an nccl group with one GPU per rank
(LOCAL_RANK; not yet run: no multi-GPU machine was lent). Every rank builds the same
problem (same seed) and calls ``dq.solve(..., process_group=...)``; each runs the model on its block of steps only and gets the
whole result. Rank 0 checks it against the single-process solve. Without torchrun it
runs as a group of one.
"""
import argparse
import datetime
import os
import tempfile

import torch
import torch.distributed as dist

import deqir_fast as dq
from deqir_fast.distributed import ShardConfig


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--solver", default="picard")
    ap.add_argument("--window", type=int, default=None)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = ap.parse_args()
    device = torch.device("cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("sharded_solve.py: --device cuda needs a CUDA build of torch and a "
                         "GPU, and this machine has none (torch.cuda.is_available() is False): "
                         "use --device cpu")
    if args.device == "cuda":                         # one GPU per rank
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:                          # torchrun: env:// rendezvous
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=5))
    else:                                             # plain `python`: a group of one
        dist.init_process_group(backend, init_method="file://" + tempfile.mktemp(), rank=0,
                                world_size=1)
    rank = dist.get_rank()

    model, chain, x_T = dq.testing.readme_problem("DDRM", seed=0)   # same draws on every rank
    chain = dq.DDRM(chain.schedule, dq.timesteps(chain.schedule, args.steps), operator=chain.operator,
                    y=chain.y, sigma_y=chain.sigma_y, eta=0.85, eta_b=1.0)
    model, x_T, chain.y = model.to(device), x_T.to(device), chain.y.to(device)
    kw = dict(solver=args.solver, window=args.window, generator=None)

    res = dq.solve(model, chain, x_T, noise=_noise(chain, x_T),
                   process_group=ShardConfig(timeout=120), **kw)
    sh = res.stats.sharding
    print(f"rank {rank}: {res.iterations} rounds, blocks {sh.blocks[:3]}..., "
          f"model+scan {sh.compute_seconds:.2f} s, idle {sh.wait_seconds:.2f} s, "
          f"{sh.bytes_sent / 2**20:.2f} MiB sent", flush=True)
    if rank == 0:
        ref = dq.solve(model, chain, x_T, noise=_noise(chain, x_T), **kw)
        print(f"single process: {ref.iterations} rounds; max |x0 - sharded x0| = "
              f"{(ref.x0 - res.x0).abs().max().item():.2e}")
    dist.destroy_process_group()


def _noise(chain, x_T):
    g = torch.Generator().manual_seed(1)
    return torch.randn((chain.num_steps, *x_T.shape), generator=g).to(x_T)


if __name__ == "__main__":
    main()
