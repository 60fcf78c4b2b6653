"""Time of one draw of each fault of ``acr_optim.faults`` on ~100M float32 parameters.

The parameters are the weight matrices of a transformer block stack, 4 x (4096, 4096) and
2 x (2048, 8192) (100.7M), N(0, 0.02); the gradients N(0, 1).  Each spec is timed as
``parse_fault(spec).values(tensors, grads, generator)`` (what the probe applies; the public
``*_error`` functions add one in-place subtraction).  Reported: the median over ``--reps`` of the
wall time and of the process CPU time (on a shared CPU the CPU time is the stable number: run
with ``--threads 1``), and the peak resident memory growth of the whole run.

Usage:  python benchmarks/faults.py [--threads 1] [--reps 3] [--scale 1.0] [--specs int8 bf16 ...]
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import torch

from acr_optim.faults import parse_fault

SPECS = [
    "int8",
    "int4:g32",
    "int4",
    "bf16",
    "fp16",
    "fp8_e4m3",
    "fp8_e5m2",
    "flip:1e-6",
    "flip:1e-4",
    "flip:1e-3:int8",
    "flips:1000",
    "flip-worst:1000",
    "flip-worst:1000:mantissa",
    "flip-worst:1000:int8",
    "prune:0.5",
    "prune:0.9:tensor",
]
SHAPES = [(4096, 4096)] * 4 + [(2048, 8192)] * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the rows of every shape (smoke runs)")
    parser.add_argument("--specs", nargs="+", default=SPECS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    shapes = [(max(1, round(rows * args.scale)), cols) for rows, cols in SHAPES]
    tensors = [torch.randn(shape, generator=gen) * 0.02 for shape in shapes]
    grads = [torch.randn(shape, generator=gen) for shape in shapes]
    total = sum(t.numel() for t in tensors)
    print(
        f"{total / 1e6:.1f}M float32 parameters in {len(tensors)} tensors, {args.threads} thread(s), torch {torch.__version__}"
    )
    print("| spec | label | wall s | CPU s |\n|---|---|---|---|")
    for spec in args.specs:
        fault = parse_fault(spec)
        walls, cpus = [], []
        for rep in range(args.reps):
            generator = torch.Generator().manual_seed(rep)
            wall, cpu = time.perf_counter(), time.process_time()
            values = fault.values(tensors, grads, generator)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
            del values
        print(
            f"| `{spec}` | {fault.label} | {statistics.median(walls):.2f} | {statistics.median(cpus):.2f} |", flush=True
        )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"peak resident memory of the run: {peak:.1f} GiB (parameters and gradients: {8 * total / 2**30:.1f} GiB)")


if __name__ == "__main__":
    main()
