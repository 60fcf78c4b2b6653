"""Step-time and memory overhead of ACR against the two-pass floor, SAM (pytorch-optimizer) and AdamW.

All variants run in ONE process on ONE model and ONE batch, interleaved in a shuffled order
each repetition; the weights are reset from a saved copy before every timed step, so each
variant steps from the same point.  Every variant owns its optimizer (its own AdamW state).
Reported times are medians over the repetitions; ratios are medians of the per-repetition
ratios of two variants timed in the same repetition (the machine may be shared: interleaving,
pairing and medians keep a background load from biasing one variant).  On a loaded CPU pass
``--threads 1``: intra-op threads waiting for a busy core stall every kernel.

Variants
  base       zero_grad, one forward/backward, AdamW step
  floor      zero_grad, two forward/backwards (the second accumulates), AdamW step: the physical
             floor of an exact two-pass method
  acr        ACR(AdamW).step(closure) for p in {2, inf}, alpha in {0.5, 1}, n in {None, 1% of k}
  fault      ACR(AdamW, fault=SPEC, fault_mode=MODE), alpha 0.5, for the fault-shaped sets (int4:g32 and
             bf16 boxes at their worst case, int8 actual = QAT, 10 worst int8 flips, 50 % pruning);
             ``/lp`` compares each with the Lp step (p=2 a=0.5 n=all) timed in the same repetition
  peer       pytorch_optimizer.SAM(AdamW, rho=eps): closure() then step(closure)
  amortized  ACR(AdamW, interval=k): time of k consecutive steps / k

Memory (per step, bytes / parameter bytes)
  held   bytes the wrapper keeps between steps beyond the base optimizer (ACR: extra_memory_bytes())
  peak   held + the peak of live bytes allocated by the wrapper's own work in one step (CPU: every
         allocation and free the allocator reports to torch.profiler inside the optimizer's calls,
         excluding the forward/backward inside closures and the wrapped AdamW step; for `base` it is
         AdamW's own step, for reference); on CUDA: max_memory_allocated during the step minus
         memory_allocated before it, which includes the forward/backward and the base step.

Usage:  python benchmarks/overhead.py [--model gpt2|mlp] [--device cpu|cuda] [--dtype fp32|bf16]
        [--batch B] [--seq-len T] [--reps R] [--quick] [--out results.json]
        python benchmarks/overhead.py --docs-from benchmarks/results/overhead_faults_cpu.json
            (rewrites the generated ``fault-overhead`` table of benchmarks/README.md from a saved run)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile, record_function

from acr_optim import ACR
from acr_optim.corruption import top_n_indices
from lab import docs

try:
    from pytorch_optimizer import SAM
except ImportError as exc:  # pragma: no cover - a benchmark-only dependency
    raise SystemExit(
        "pip install -r benchmarks/requirements.txt (pytorch-optimizer is needed for the SAM peer)"
    ) from exc


# -- models and batches ---------------------------------------------------------------------------


def build_gpt2(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=args.vocab,
        n_positions=args.seq_len,
        n_embd=args.n_embd,
        n_layer=args.n_layer,
        n_head=max(1, args.n_embd // 64),
        bos_token_id=0,
        eos_token_id=0,
    )
    model = GPT2LMHeadModel(config).to(device)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(0)).to(
        device
    )
    return model, lambda: model(input_ids=ids, labels=ids).loss


def build_mlp(args: argparse.Namespace, device: torch.device) -> tuple[nn.Module, Callable[[], torch.Tensor]]:
    width = args.n_embd * 4
    layers: list[nn.Module] = [nn.Linear(args.mlp_in, width), nn.GELU()]
    for _ in range(args.n_layer - 1):
        layers += [nn.Linear(width, width), nn.GELU()]
    model = nn.Sequential(*layers, nn.Linear(width, 10)).to(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch * 16, args.mlp_in, generator=gen).to(device)
    y = torch.randint(0, 10, (args.batch * 16,), generator=gen).to(device)
    return model, lambda: nn.functional.cross_entropy(model(x), y)


# -- variants -----------------------------------------------------------------------------------


@dataclass
class Variant:
    name: str
    step: Callable[[], None]  # one timed unit of work
    steps_per_unit: int = 1
    optimizer: object | None = None
    kind: str = "acr"  # base | floor | acr | peer | amortized


def make_variants(args, model, forward, eps: float) -> list[Variant]:
    params = [p for p in model.parameters() if p.requires_grad]
    k = sum(p.numel() for p in params)
    autocast = torch.autocast(params[0].device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")

    def closure() -> torch.Tensor:
        with record_function("fwdbwd"):
            with autocast:
                loss = forward()
            loss.backward()
        return loss

    def adamw() -> torch.optim.AdamW:
        return torch.optim.AdamW(params, lr=1e-4)

    variants: list[Variant] = []

    base = adamw()

    def base_step() -> None:
        base.zero_grad()
        closure()
        with record_function("opt"):
            base.step()

    variants.append(Variant("base", base_step, optimizer=base, kind="base"))

    floor = adamw()

    def floor_step() -> None:
        floor.zero_grad()
        closure()
        closure()
        with record_function("opt"):
            floor.step()

    variants.append(Variant("floor", floor_step, optimizer=floor, kind="floor"))

    n_small = max(1, k // 100)
    for p in (2.0, math.inf):
        for alpha in (0.5, 1.0):
            for n in (None, n_small):
                # p = inf uses eps / sqrt(k): the same Euclidean length as the p = 2 corruption
                opt = ACR(adamw(), eps=eps if p == 2 else eps / math.sqrt(k), p=p, alpha=alpha, n=n)
                _mark_base_step(opt.base_optimizer)
                name = f"acr p={'inf' if p == math.inf else 2} a={alpha:g} n={'all' if n is None else '1%'}"
                variants.append(Variant(name, _acr_step(opt, closure), optimizer=opt))

    for spec, mode in FAULT_SETS:
        opt = ACR(adamw(), alpha=0.5, fault=spec, fault_mode=mode)
        _mark_base_step(opt.base_optimizer)
        variants.append(Variant(f"acr fault={spec} {mode}", _acr_step(opt, closure), optimizer=opt))

    sam = SAM(params, torch.optim.AdamW, rho=eps, lr=1e-4)
    _mark_base_step(sam.base_optimizer)

    def sam_step() -> None:
        sam.zero_grad()
        closure()
        with record_function("opt"):
            sam.step(closure)

    variants.append(Variant("peer SAM", sam_step, optimizer=sam, kind="peer"))

    for interval in args.intervals:
        opt = ACR(adamw(), eps=eps, p=2, alpha=0.5, interval=interval)
        _mark_base_step(opt.base_optimizer)
        one = _acr_step(opt, closure)

        def cycle(one=one, interval=interval) -> None:
            for _ in range(interval):
                one()

        variants.append(Variant(f"amortized k={interval}", cycle, interval, optimizer=opt, kind="amortized"))
    return variants


FAULT_SETS = [
    ("int4:g32", "worst"),
    ("bf16", "worst"),
    ("int8", "actual"),
    ("flips:10:int8", "worst"),
    ("prune:0.5", "actual"),
]
LP_STEP = "acr p=2 a=0.5 n=all"


def _mark_base_step(base: torch.optim.Optimizer) -> None:
    """Label the wrapped base optimizer's own step so its allocations are not counted as the wrapper's."""
    step = base.step

    def marked(*args, **kwargs):
        with record_function("basestep"):
            return step(*args, **kwargs)

    base.step = marked


def _acr_step(opt: ACR, closure: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        opt.zero_grad()
        with record_function("opt"):
            opt.step(closure)

    return step


# -- measurement ----------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall seconds of ``fn()``, the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def time_variants(variants, params, saved, device, reps: int, seed: int = 0) -> dict[str, list[float]]:
    """Seconds per optimizer step of each variant, one sample per repetition, shuffled order each repetition."""
    rng = random.Random(seed)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for v in variants:  # warm-up: optimizer state, ACR backups, allocator caches
        reset(params, saved)
        v.step()
    for _ in range(reps):
        order = list(variants)
        rng.shuffle(order)
        for v in order:
            reset(params, saved)
            times[v.name].append(timed(v.step, device) / v.steps_per_unit)
    return times


@torch.no_grad()
def reset(params: list[torch.Tensor], saved: list[torch.Tensor]) -> None:
    torch._foreach_copy_(params, saved)


def held_bytes(opt: object) -> int:
    if isinstance(opt, ACR):
        return opt.extra_memory_bytes()
    if isinstance(opt, SAM):
        return sum(t.numel() * t.element_size() for s in opt.state.values() for key, t in s.items() if key == "old_p")
    return 0


def _walk(nodes, out):
    for node in nodes:
        out.append(node)
        _walk(node.children, out)


def cpu_optimizer_peak(step: Callable[[], None]) -> int:
    """Peak of live bytes allocated inside ``record_function("opt")``, not inside a nested ``"fwdbwd"``
    (the closure's forward/backward) or ``"basestep"`` (a wrapper's base optimizer step)."""
    from torch._C._profiler import _EventType

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    nodes: list = []
    _walk(prof.profiler.kineto_results.experimental_event_tree(), nodes)
    events = []
    for node in nodes:
        if node.tag != _EventType.Allocation:
            continue
        owner, parent = None, node.parent
        while parent is not None and owner is None:
            if parent.name in ("opt", "fwdbwd", "basestep"):
                owner = parent.name
            parent = parent.parent
        events.append((node.start_time_ns, node.extra_fields.ptr, node.extra_fields.alloc_size, owner))
    events.sort(key=lambda e: e[0])
    live: dict[int, int] = {}
    current = peak = 0
    for _, ptr, size, owner in events:
        if size > 0 and owner == "opt":
            live[ptr] = size
            current += size
            peak = max(peak, current)
        elif size < 0 and ptr in live:
            current -= live.pop(ptr)
    return peak


def cuda_step_peak(step: Callable[[], None], device: torch.device) -> int:
    sync(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    sync(device)
    return torch.cuda.max_memory_allocated(device) - before


def measure_memory(variants, params, saved, device) -> dict[str, dict[str, int]]:
    out = {}
    for v in variants:
        if v.kind == "floor":
            continue
        reset(params, saved)
        held = held_bytes(v.optimizer)
        peak = cuda_step_peak(v.step, device) if device.type == "cuda" else held + cpu_optimizer_peak(v.step)
        out[v.name] = {"held": held_bytes(v.optimizer), "peak": peak}
    return out


def selection_cost(params: list[torch.Tensor], n: int, reps: int) -> dict[str, float]:
    """Median time of the global top-n selection against one pass over the gradients.

    Two yardsticks for "one pass": a norm (read only) and a copy into a held buffer (read + write).
    """
    grads = [p.grad for p in params if p.grad is not None]
    buffers = [torch.empty_like(g) for g in grads]
    device = grads[0].device
    samples: dict[str, list[float]] = {"select_s": [], "norm_pass_s": [], "copy_pass_s": []}
    work = {
        "select_s": lambda: top_n_indices(grads, n),
        "norm_pass_s": lambda: torch._foreach_norm(grads),
        "copy_pass_s": lambda: torch._foreach_copy_(buffers, grads),
    }
    for _ in range(reps):
        for key, fn in work.items():
            samples[key].append(timed(fn, device))
    return {"n": n} | {key: statistics.median(ts) for key, ts in samples.items()}


# -- report -----------------------------------------------------------------------------------------


def summarise(times, memory, param_bytes) -> dict:
    """Per variant: median time and, for each ratio, the median over repetitions of the PAIRED ratio
    (both variants timed in the same repetition), which cancels slow drifts of a shared machine's load."""

    def paired(name: str, other: str) -> float:
        return statistics.median(a / b for a, b in zip(times[name], times[other]))

    rows = {}
    for name, ts in times.items():
        row = {"median_s": statistics.median(ts), "iqr_s": iqr(ts), "vs_base": paired(name, "base")}
        if name.startswith("acr"):
            row["vs_floor"] = paired(name, "floor")
            if "peer SAM" in times:  # scaling.py times base, floor and one ACR only
                row["vs_peer"] = paired(name, "peer SAM")
            if "fault=" in name and LP_STEP in times:
                row["vs_lp"] = paired(name, LP_STEP)
        if name in memory:
            row["held_x_params"] = memory[name]["held"] / param_bytes
            row["peak_x_params"] = memory[name]["peak"] / param_bytes
        rows[name] = row
    return rows


def check_targets(rows: dict, intervals: list[int], device: torch.device) -> list[dict]:
    """The issue's targets, each with the measured value, the bound and whether it holds."""
    floor_bound = 1.02 if device.type == "cuda" else 1.05
    checks = [
        ("acr/floor, p=2 a=0.5 n=all", "acr p=2 a=0.5 n=all", "vs_floor", floor_bound),
        ("acr/peer, p=2 a=1 n=all", "acr p=2 a=1 n=all", "vs_peer", 1.0),
    ]
    checks += [(f"held/params, {name}", name, "held_x_params", 1.0) for name in rows if name.startswith("acr")]
    # a box (quantization, cast) costs a step-size pass and a sign pass where the ball costs a norm pass
    checks += [
        (f"fault/lp, {name}", name, "vs_lp", 1.1) for name in rows if "fault=int4" in name or "fault=bf16" in name
    ]
    checks += [(f"amortized/base, k={k}", f"amortized k={k}", "vs_base", 1 + 1 / k + 0.05) for k in intervals]
    checks = [(target, rows[name][key], bound) for target, name, key, bound in checks if name in rows]
    return [{"target": name, "value": value, "bound": bound, "met": value <= bound} for name, value, bound in checks]


def iqr(xs: list[float]) -> float:
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return q[2] - q[0]


def print_table(rows: dict, header: str) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=header)
    for col in ("variant", "ms/step", "IQR ms", "/base", "/floor", "/peer", "/lp", "held/params", "peak/params"):
        table.add_column(col, justify="right" if col != "variant" else "left")
    fmt = lambda row, key, spec: format(row[key], spec) if key in row else ""
    for name, row in rows.items():
        table.add_row(
            name,
            f"{row['median_s'] * 1e3:.1f}",
            f"{row['iqr_s'] * 1e3:.1f}",
            fmt(row, "vs_base", ".3f"),
            fmt(row, "vs_floor", ".3f"),
            fmt(row, "vs_peer", ".3f"),
            fmt(row, "vs_lp", ".3f"),
            fmt(row, "held_x_params", ".3f"),
            fmt(row, "peak_x_params", ".3f"),
        )
    Console(width=160).print(table)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["gpt2", "mlp"], default="gpt2")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32", help="bf16 = autocast forward")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--n-embd", type=int, default=None, help="GPT-2 width (MLP: width / 4)")
    parser.add_argument("--n-layer", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--mlp-in", type=int, default=1024)
    parser.add_argument("--eps", type=float, default=0.05, help="L2 radius (p = inf uses eps / sqrt(k))")
    parser.add_argument("--intervals", type=int, nargs="+", default=[2, 5])
    parser.add_argument("--only", default=None, help="regex: time only the ACR/amortized variants it matches")
    parser.add_argument("--reps", type=int, default=None, help="timed repetitions per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="a tiny model and few repetitions (smoke run)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--docs-from", default=None, help="only rewrite benchmarks/README.md's fault-overhead table from this JSON"
    )
    args = parser.parse_args(argv)
    gpu = args.device.startswith("cuda")
    # defaults: ~5M-parameter GPT-2 on CPU, GPT-2 small (124M) on GPU, a tiny one with --quick
    size = (128, 2, 2048, 4, 5) if args.quick else (768, 12, 50257, 16, 30) if gpu else (256, 4, 8192, 4, 11)
    for name, value in zip(("n_embd", "n_layer", "vocab", "batch", "reps"), size):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.quick:
        args.seq_len = min(args.seq_len, 64)
    return args


def machine() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    info["cpu_count"] = os.cpu_count()
    info["threads"] = torch.get_num_threads()
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = os.getloadavg()
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


FAULT_DOCS = "fault-overhead"
README = Path(__file__).resolve().parent / "README.md"


def fault_overhead_table(result: dict) -> str:
    """The fault-set rows of a saved run against the Lp step, as benchmarks/README.md shows them."""
    config, rows = result["config"], result["rows"]
    setting = (
        f"{config['model']}, {config['params'] / 1e6:.2f}M parameters, {config['reps']} repetitions, "
        f"torch {result['machine']['torch']}, {result['machine']['threads']} thread(s)"
    )
    lines = [
        setting,
        "",
        "| variant | ms/step | IQR ms | /Lp step | held / params | peak / params |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, row in rows.items():
        if name == LP_STEP or "fault=" in name:
            lp = "1.000" if name == LP_STEP else f"{row['vs_lp']:.3f}"
            lines.append(
                f"| {name} | {row['median_s'] * 1e3:.1f} | {row['iqr_s'] * 1e3:.1f} | {lp} | "
                f"{row['held_x_params']:.2f} | {row['peak_x_params']:.2f} |"
            )
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.docs_from:
        result = json.loads(Path(args.docs_from).read_text())
        README.write_text(docs.fill(README.read_text(), {FAULT_DOCS: fault_overhead_table(result)}))
        return result
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model, forward = (build_gpt2 if args.model == "gpt2" else build_mlp)(args, device)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    k = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    info = machine()
    variants = make_variants(args, model, forward, args.eps)
    if args.only:
        keep = ("base", "floor", "peer")
        variants = [v for v in variants if v.kind in keep or v.name == LP_STEP or re.search(args.only, v.name)]
    times = time_variants(variants, params, saved, device, args.reps)
    memory = measure_memory(variants, params, saved, device)
    rows = summarise(times, memory, param_bytes)
    selection = selection_cost(params, max(1, k // 100), args.reps)
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = os.getloadavg()
    header = (
        f"{args.model} k={k / 1e6:.2f}M params, batch {args.batch}"
        + (f" x {args.seq_len} tokens" if args.model == "gpt2" else "")
        + f", {args.dtype}, {device}, torch {torch.__version__}, {info['threads']} threads, {args.reps} reps"
    )
    print_table(rows, header)
    targets = check_targets(rows, args.intervals, device)
    for t in targets:
        print(f"{'met   ' if t['met'] else 'MISSED'} {t['target']}: {t['value']:.3f} (bound {t['bound']:.3f})")
    print(
        f"top-n selection (n = 1% of k = {selection['n']}): {selection['select_s'] * 1e3:.1f} ms = "
        f"{selection['select_s'] / selection['copy_pass_s']:.2f} x one copy pass "
        f"({selection['copy_pass_s'] * 1e3:.2f} ms) = {selection['select_s'] / selection['norm_pass_s']:.2f} x one "
        f"norm pass ({selection['norm_pass_s'] * 1e3:.2f} ms) over the gradients"
    )
    result = {
        "config": vars(args) | {"params": k, "param_bytes": param_bytes},
        "machine": info,
        "rows": rows,
        "selection": selection,
        "targets": targets,
        "samples_s": times,
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    return result


if __name__ == "__main__":
    main()
