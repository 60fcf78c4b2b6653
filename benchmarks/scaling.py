"""How the cost of ACR grows with the model: step time, memory, elementwise work and the cost of ``probe()``.

One command, four measurements, on GPT-2 models built from ``GPT2Config`` (no download) of about
1M, 10M, 30M and 100M parameters and on the 4.2M-parameter MLP of ``overhead.py``:

1. **Step time and memory** of ``ACR(AdamW, eps=0.1, p=2, alpha=0.5)`` against plain AdamW and the
   two-pass floor, measured exactly as ``overhead.py`` does (its functions are imported, not
   copied): one model and one batch per size, the three variants interleaved in a new shuffled order
   every repetition, weights reset before every timed step, medians of the per-repetition paired
   ratios; ``held`` and ``peak`` memory in units of the parameter bytes as ``overhead.py`` defines them.
2. **The elementwise work ACR adds per step** against its bandwidth limit.  For ``k`` parameters of
   ``s`` bytes each (``s = 4`` for float32, 2 for bf16/fp16), one param group, ``p = 2``,
   ``alpha = 0.5``, ``n = None``, ACR's own passes over memory are::

       norm     ||g||_2                    read g                    1 k s
       backup   b <- w                     read w, write b           2 k s
       perturb  w <- w + (eps / ||g||) g   read w and g, write w     3 k s
       restore  w <- b                     read b, write w           2 k s
       mix      g <- alpha (g + g')        read g, write g           2 k s
                                                                    ------
       bytes per step                                               10 k s     (40 k for float32)

   (At ``alpha = 0.5`` the clean gradient needs no pre-scaling pass; the corrupted backward's
   accumulation into ``.grad`` happens in the floor too and is not counted.)  The machine's copy
   bandwidth ``B`` is the median of (bytes read + bytes written) / seconds of a large
   ``Tensor.copy_`` (``--bandwidth-mb``), and ``predicted = 10 k s / B`` seconds is reported next to
   the time ``perturb() + restore()`` take on their own (``isolated``, the same five passes without
   the forward/backwards) and the measured in-step cost, the median over repetitions of the paired
   difference ``t(ACR) - t(floor)``.  The passes are also timed one by one on the model's own
   tensors (``norm``, ``copy``, in-place ``add``, ``scale``), with the out-of-place ``add`` into a
   buffer (``add_out``) that a perturbation by storage swap would use instead of backup + perturb +
   restore.
3. **The cost of** ``acr_optim.probe.probe(model, batches, eps=[3 values], by="layer")`` on the
   largest GPT-2 model: its wall time against one gradient pass plus the number of evaluations it
   performs (counted: ``loss_fn`` calls outside autograd) times the time of one evaluation.  For
   ``B`` batches, ``E`` eps values and ``G`` groups of ``by="layer"`` (GPT-2: ``wte``, ``wpe``,
   ``h.0`` ... ``h.{L-1}``, ``ln_f``, so ``G = L + 3``; plus the ``"all"`` group), probe runs
   ``B`` gradient calls (one gradient pass) and ``B (1 + E (G + 1))`` evaluations: the clean loss
   once, then one loss per row.  ``predicted = grad + evaluations x eval``; the rest is probe's own
   work per row (building each corruption, its norms and dot product in float64, restoring the group).

Model sizes (``--seq-len 128``: ``n_positions = 128``; tied ``lm_head``; ``n_head = n_embd / 64``)::

    slot   n_embd  n_layer  vocab   parameters
    1M        128        2   4608    1,003,008
    10M       256       10   8192   10,028,032
    30M       512        7  16384   30,521,856
    100M      768       12  20000  100,514,304
    mlp     1024 -> 4 x 1024 -> 10   4,208,650   (overhead.py --model mlp; batch 64 rows)

Batch: 2 x 128 tokens for every GPT-2 size (the 100M model then takes ~3 s per forward/backward on one
CPU thread).  ``--quick`` runs a tiny GPT-2 stand-in in every slot (and the same MLP) with 3 repetitions:
a smoke run of a few seconds.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/scaling.py --threads 1 --out benchmarks/results/scaling_cpu.json \\
        --plot benchmarks/results/scaling_cpu.png                             # ~12 min on 2 shared cores
    python benchmarks/scaling.py --device cuda --out scaling_cuda.json         # GPU
    python benchmarks/scaling.py --quick --out /tmp/scaling.json               # smoke run
    python benchmarks/scaling.py --from-json benchmarks/results/scaling_cpu.json --plot scaling.png
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from collections import Counter
from collections.abc import Callable

import overhead  # benchmarks/overhead.py: run this file as a script, from any directory
import torch

from acr_optim.probe import default_loss, group_parameters, probe

# slot: (n_embd, n_layer, vocab) of GPT2Config
SIZES = {"1M": (128, 2, 4608), "10M": (256, 10, 8192), "30M": (512, 7, 16384), "100M": (768, 12, 20000)}
QUICK_SIZES = {"1M": (32, 1, 256), "10M": (32, 2, 512), "30M": (64, 1, 1024), "100M": (64, 2, 2048)}
MLP = (256, 4, 4)  # overhead.py's MLP: --n-embd 256 (width 1024) --n-layer 4 --batch 4 (64 rows)
SLOTS = [*SIZES, "mlp"]
# repetitions per slot: about 12 minutes in all on one CPU thread (the 100M model takes ~18 s a repetition)
REPS = {"1M": 41, "10M": 25, "30M": 21, "100M": 17, "mlp": 61}
QUICK_REPS = 3  # a median of 3 paired ratios: one descheduled sample cannot move it
EPS = 0.1
PROBE_EPS = [0.01, 0.1, 1.0]
# the variants of overhead.make_variants this script times; "acr p=2 a=0.5 n=all" is ACR(AdamW, eps, p=2, alpha=0.5)
ADAMW, FLOOR, ACR_VARIANT = "base", "floor", "acr p=2 a=0.5 n=all"
# ACR's passes over memory in one step, in units of k s bytes (see the module docstring)
ACR_PASSES = {"norm": 1, "backup": 2, "perturb": 3, "restore": 2, "mix": 2}


def model_args(slot: str, args: argparse.Namespace) -> argparse.Namespace:
    """``overhead.py``'s arguments for the model in ``slot`` (so its builders and variants apply as they are)."""
    common = ["--device", args.device, "--eps", str(EPS)]
    if slot == "mlp":
        width, layers, batch = MLP
        return overhead.parse_args(
            ["--model", "mlp", "--n-embd", str(width), "--n-layer", str(layers)] + common + ["--batch", str(batch)]
        )
    n_embd, n_layer, vocab = (QUICK_SIZES if args.quick else SIZES)[slot]
    shape = ["--n-embd", str(n_embd), "--n-layer", str(n_layer), "--vocab", str(vocab)]
    return overhead.parse_args(
        ["--model", "gpt2", *shape, "--batch", str(args.batch), "--seq-len", str(args.seq_len)] + common
    )


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    return statistics.median(overhead.timed(fn, device) for _ in range(reps))


def copy_bandwidth(megabytes: int, device: torch.device, reps: int) -> dict:
    """Median (bytes read + bytes written) per second of ``dst.copy_(src)`` on two float32 tensors of ``megabytes``."""
    src = torch.ones(megabytes * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # touch every page before timing
    seconds = median_seconds(lambda: dst.copy_(src), device, reps)
    moved = 2 * src.numel() * src.element_size()
    return {"megabytes": megabytes, "reps": reps, "median_s": seconds, "bytes_per_s": moved / seconds}


# -- one model: step time, memory, elementwise work ---------------------------------------------


def measure_model(slot: str, margs: argparse.Namespace, device: torch.device, reps: int, bandwidth: float) -> dict:
    torch.manual_seed(0)
    build = overhead.build_gpt2 if margs.model == "gpt2" else overhead.build_mlp
    model, forward = build(margs, device)
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    k = sum(p.numel() for p in params)
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"[{slot}] {k:,} parameters, {reps} repetitions", flush=True)
    variants = [
        v for v in overhead.make_variants(margs, model, forward, margs.eps) if v.name in (ADAMW, FLOOR, ACR_VARIANT)
    ]
    times = overhead.time_variants(variants, params, saved, device, reps)
    memory = overhead.measure_memory(variants, params, saved, device)
    rows = overhead.summarise(times, memory, param_bytes)
    acr = next(v.optimizer for v in variants if v.name == ACR_VARIANT)
    differences = [a - f for a, f in zip(times[ACR_VARIANT], times[FLOOR])]  # paired: same repetition
    elementwise = elementwise_work(acr, forward, params, saved, device, max(reps, 5))
    elementwise.update(
        bytes=sum(ACR_PASSES.values()) * param_bytes,
        predicted_s=sum(ACR_PASSES.values()) * param_bytes / bandwidth,
        in_step_s=statistics.median(differences),
        in_step_iqr_s=overhead.iqr(differences),
        in_step_x_floor=statistics.median(differences) / rows[FLOOR]["median_s"],
        model_copy_bytes_per_s=2 * param_bytes / elementwise["copy_s"],
    )
    if margs.model == "gpt2":
        shape = {"n_embd": margs.n_embd, "n_layer": margs.n_layer, "vocab": margs.vocab, "n_positions": margs.seq_len}
        batch = f"{margs.batch} x {margs.seq_len} tokens"
    else:
        shape = {"in": margs.mlp_in, "width": margs.n_embd * 4, "n_layer": margs.n_layer, "out": 10}
        batch = f"{margs.batch * 16} rows"
    return {
        "model": margs.model,
        "shape": shape,
        "batch": batch,
        "params": k,
        "param_bytes": param_bytes,
        "reps": reps,
        "loadavg_start": load,
        "ratios": {
            "floor/AdamW": rows[FLOOR]["vs_base"],
            "ACR/AdamW": rows[ACR_VARIANT]["vs_base"],
            "ACR/floor": rows[ACR_VARIANT]["vs_floor"],
        },
        "median_s": {
            "AdamW": rows[ADAMW]["median_s"],
            "floor": rows[FLOOR]["median_s"],
            "ACR": rows[ACR_VARIANT]["median_s"],
        },
        "iqr_s": {"AdamW": rows[ADAMW]["iqr_s"], "floor": rows[FLOOR]["iqr_s"], "ACR": rows[ACR_VARIANT]["iqr_s"]},
        "memory_x_params": {
            "ACR held": rows[ACR_VARIANT]["held_x_params"],
            "ACR peak": rows[ACR_VARIANT]["peak_x_params"],
            "AdamW step peak": rows[ADAMW]["peak_x_params"],
        },
        "elementwise": elementwise,
        "rows": rows,
        "samples_s": times,
    }


def elementwise_work(acr, forward, params, saved, device: torch.device, reps: int) -> dict:
    """Seconds of ACR's ``perturb() + restore()`` on a real clean gradient, and of its passes one by one.

    Timed with ``overhead.time_variants`` (shuffled, interleaved): it resets weights *and* gradients
    from saved copies before every sample, so each sample starts from the same clean gradient.
    """
    overhead.reset(params, saved)
    acr.zero_grad()
    forward().backward()
    weights = [p.detach() for p in params]
    grads = [p.grad for p in params]
    clean = [g.detach().clone() for g in grads]
    buffers = [torch.empty_like(w) for w in weights]

    def perturb_restore() -> None:
        acr.perturb()
        acr.restore()

    def add_out() -> None:
        for w, g, b in zip(weights, grads, buffers):
            torch.add(w, g, alpha=1e-3, out=b)

    work = {
        "isolated_s": perturb_restore,  # ACR's own five passes: norm, backup, perturb, restore, mix
        "norm_s": lambda: torch._foreach_norm(grads),  # 1 k s
        "copy_s": lambda: torch._foreach_copy_(buffers, weights),  # 2 k s (backup, restore)
        "add_s": lambda: torch._foreach_add_(weights, grads, alpha=1e-3),  # 3 k s (perturb)
        "scale_s": lambda: torch._foreach_mul_(grads, 0.5),  # 2 k s (mix)
        "add_out_s": add_out,  # 3 k s: b <- w + s g, the perturbation a storage swap would use
    }
    variants = [overhead.Variant(name, fn) for name, fn in work.items()]
    samples = overhead.time_variants(variants, weights + grads, saved + clean, device, reps, seed=1)
    overhead.reset(params, saved)
    out = {name: statistics.median(ts) for name, ts in samples.items()}
    out["passes_sum_s"] = out["norm_s"] + 2 * out["copy_s"] + out["add_s"] + out["scale_s"]
    out["swap_alternative_s"] = out["norm_s"] + out["add_out_s"] + out["scale_s"]
    return out


# -- probe() ------------------------------------------------------------------------------------


def probe_cost(slot: str, margs: argparse.Namespace, device: torch.device, n_batches: int, reps: int) -> dict:
    """Wall time of ``probe(by="layer")`` against one gradient pass + (counted evaluations) x (one evaluation)."""
    torch.manual_seed(0)
    model, _ = overhead.build_gpt2(margs, device)
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(n_batches):
        ids = torch.randint(0, margs.vocab, (margs.batch, margs.seq_len), generator=generator).to(device)
        batches.append({"input_ids": ids, "labels": ids})
    calls: Counter[str] = Counter()

    def loss_fn(model, batch):
        calls["gradient" if torch.is_grad_enabled() else "evaluation"] += 1
        return default_loss(model, batch)

    params = [p for p in model.parameters() if p.requires_grad]
    model.eval()  # as probe() runs the model

    def gradient_pass() -> None:  # what probe computes once: grad L(w), L the mean over the batches
        total = [torch.zeros_like(p) for p in params]
        for batch in batches:
            torch._foreach_add_(total, torch.autograd.grad(loss_fn(model, batch), params))

    def evaluation() -> None:  # one loss_fn call on one batch, as probe() evaluates it
        with torch.inference_mode():
            float(loss_fn(model, batches[0]))

    gradient_pass()  # warm-up
    evaluation()
    grad_s = median_seconds(gradient_pass, device, reps)
    eval_s = median_seconds(evaluation, device, max(reps, 5))
    calls.clear()
    overhead.sync(device)
    t0 = time.perf_counter()
    table = probe(model, batches, eps=PROBE_EPS, by="layer", loss_fn=loss_fn)
    overhead.sync(device)
    probe_s = time.perf_counter() - t0
    groups = len(group_parameters(model, "layer"))
    with_all = groups + (groups > 1)
    evaluations = n_batches * (1 + len(PROBE_EPS) * with_all)
    return {
        "model": slot,
        "params": sum(p.numel() for p in params),
        "n_layer": margs.n_layer,
        "eps": PROBE_EPS,
        "batches": n_batches,
        "batch": f"{margs.batch} x {margs.seq_len} tokens",
        "groups": groups,
        "rows": len(table.rows),
        "gradient_calls": calls["gradient"],
        "evaluations": calls["evaluation"],
        "expected_evaluations": evaluations,
        "formula": "B (1 + E (G + 1)), G = n_layer + 3",
        "probe_s": probe_s,
        "gradient_pass_s": grad_s,
        "evaluation_s": eval_s,
        "predicted_s": grad_s + calls["evaluation"] * eval_s,
    }


# -- report ---------------------------------------------------------------------------------------


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---", *["---:"] * (len(header) - 1)]) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"


def _name(slot: str, m: dict, quick: bool = False) -> str:
    s = m["shape"]
    if m["model"] == "mlp":
        return f"MLP {s['in']} -> {s['n_layer']} x {s['width']} -> {s['out']}"
    return f"GPT-2 {slot}{' slot, quick' if quick else ''} ({s['n_embd']} x {s['n_layer']}, V {s['vocab']})"


def tables(result: dict) -> str:
    models, quick = result["models"], result["config"].get("quick", False)
    step = [
        [
            _name(slot, m, quick),
            f"{m['params']:,}",
            str(m["reps"]),
            _ms(m["median_s"]["AdamW"]),
            _ms(m["median_s"]["floor"]),
            _ms(m["median_s"]["ACR"]),
            f"{m['ratios']['floor/AdamW']:.3f}",
            f"{m['ratios']['ACR/AdamW']:.3f}",
            f"{m['ratios']['ACR/floor']:.3f}",
            f"{m['memory_x_params']['ACR held']:.2f}",
            f"{m['memory_x_params']['ACR peak']:.2f}",
            f"{m['memory_x_params']['AdamW step peak']:.2f}",
        ]
        for slot, m in models.items()
    ]
    out = [
        (
            "Step time (median ms) and paired ratios; memory in parameter bytes (ACR: held between steps, "
            "peak of its own work in a step; AdamW: peak of its own step, for reference)"
        ),
        "",
        markdown(
            [
                "model",
                "params",
                "reps",
                "AdamW ms",
                "floor ms",
                "ACR ms",
                "floor/AdamW",
                "ACR/AdamW",
                "ACR/floor",
                "ACR held",
                "ACR peak",
                "AdamW peak",
            ],
            step,
        ),
    ]
    bw = result["bandwidth"]
    work = []
    for slot, m in models.items():
        e = m["elementwise"]
        work.append(
            [
                _name(slot, m, quick),
                f"{e['bytes'] / 1e6:.0f}",
                _ms(e["predicted_s"]),
                _ms(e["isolated_s"]),
                f"{_ms(e['in_step_s'])} ({_ms(e['in_step_iqr_s'])})",
                f"{e['in_step_s'] / e['predicted_s']:.2f}",
                f"{100 * e['in_step_x_floor']:.1f}",
                f"{100 * e['predicted_s'] / m['median_s']['floor']:.1f}",
                " / ".join(_ms(e[key]) for key in ("norm_s", "copy_s", "add_s", "scale_s", "add_out_s")),
                f"{e['model_copy_bytes_per_s'] / 1e9:.1f}",
            ]
        )
    out += [
        "",
        (
            f"Elementwise work of ACR per step: 10 k s bytes against the copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s "
            f"(read + written, median `copy_` of {bw['megabytes']} MB); in-step = median paired t(ACR) - t(floor)"
        ),
        "",
        markdown(
            [
                "model",
                "MB moved",
                "predicted ms",
                "isolated ms",
                "in-step ms (IQR)",
                "in-step / predicted",
                "in-step % of floor",
                "predicted % of floor",
                "norm / copy / add / scale / add_out ms",
                "model copy GB/s",
            ],
            work,
        ),
    ]
    if result.get("probe"):
        p = result["probe"]
        out += [
            "",
            (
                f'probe(model, batches, eps={p["eps"]}, by="layer") on GPT-2 {p["model"]} ({p["params"]:,} parameters), '
                f"{p['batches']} batch(es) of {p['batch']}"
            ),
            "",
            markdown(
                [
                    "groups (+all)",
                    "rows",
                    "gradient calls",
                    "evaluations",
                    "B (1 + E (G + 1))",
                    "probe s",
                    "gradient pass s",
                    "one evaluation s",
                    "predicted s",
                    "probe / predicted",
                ],
                [
                    [
                        f"{p['groups']} (+1)",
                        str(p["rows"]),
                        str(p["gradient_calls"]),
                        str(p["evaluations"]),
                        str(p["expected_evaluations"]),
                        f"{p['probe_s']:.2f}",
                        f"{p['gradient_pass_s']:.3f}",
                        f"{p['evaluation_s']:.3f}",
                        f"{p['predicted_s']:.2f}",
                        f"{p['probe_s'] / p['predicted_s']:.2f}",
                    ]
                ],
            ),
        ]
    return "\n".join(out)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = result["models"]
    gpt2 = [m for m in models.values() if m["model"] == "gpt2"]
    mlp = [m for m in models.values() if m["model"] == "mlp"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, color in (("ACR/floor", "C0"), ("ACR/AdamW", "C1"), ("floor/AdamW", "C2")):
        left.plot(
            [m["params"] for m in gpt2], [m["ratios"][key] for m in gpt2], "o-", color=color, label=f"GPT-2 {key}"
        )
        left.plot([m["params"] for m in mlp], [m["ratios"][key] for m in mlp], "s", color=color, mfc="none")
    limit = [1 + m["elementwise"]["predicted_s"] / m["median_s"]["floor"] for m in gpt2]
    left.plot([m["params"] for m in gpt2], limit, "--", color="C0", lw=1, label="1 + predicted / floor")
    left.axhline(1.05, color="grey", ls=":", lw=1)
    left.set(xscale="log", xlabel="parameters", ylabel="step-time ratio (median of paired ratios)")
    left.set_title("step time (open squares: 4.2M MLP)", fontsize=10)
    left.legend(fontsize=8)
    for key, label, style in (
        ("predicted_s", "predicted 10 k s / B", "k--"),
        ("isolated_s", "perturb + restore", "o-"),
        ("in_step_s", "in step: ACR - floor", "s-"),
    ):
        points = [(m["params"], m["elementwise"][key] * 1e3) for m in gpt2 if m["elementwise"][key] > 0]  # log y
        if points:
            right.plot(*zip(*points), style, label=label)
    for m in mlp:
        right.plot(
            [m["params"]] * 2,
            [m["elementwise"]["isolated_s"] * 1e3, m["elementwise"]["in_step_s"] * 1e3],
            "x",
            color="grey",
        )
    right.set(xscale="log", yscale="log", xlabel="parameters", ylabel="ms per step")
    right.set_title("ACR's elementwise work (x: MLP)", fontsize=10)
    right.legend(fontsize=8)
    fig.suptitle(
        f"{result['config']['device']}, torch {result['machine']['torch']}, {result['machine']['threads']} thread(s)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (pass 1 on a shared CPU)")
    parser.add_argument("--models", nargs="+", choices=SLOTS, default=SLOTS, help="slots to run")
    parser.add_argument("--reps", type=int, default=None, help="repetitions for every slot (default: per slot)")
    parser.add_argument("--batch", type=int, default=2, help="GPT-2 sequences per batch")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--bandwidth-mb", type=int, default=None, help="size of the copy_ bandwidth test (512 MB)")
    parser.add_argument("--probe-batches", type=int, default=None, help="batches given to probe() (1; --quick 2)")
    parser.add_argument("--no-probe", action="store_true")
    parser.add_argument("--quick", action="store_true", help="tiny GPT-2 stand-ins, 3 repetitions: a smoke run")
    parser.add_argument("--out", default=None, help="write every result as JSON here")
    parser.add_argument("--plot", default=None, help="write the figure (PNG) here")
    parser.add_argument("--from-json", default=None, help="print the tables (and --plot) of a saved result; no run")
    args = parser.parse_args(argv)
    if args.bandwidth_mb is None:
        args.bandwidth_mb = 32 if args.quick else 512
    if args.probe_batches is None:
        args.probe_batches = 2 if args.quick else 1
    return args


def run(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    info = overhead.machine()
    bandwidth = copy_bandwidth(args.bandwidth_mb, device, 5 if args.quick else 11)
    print(f"copy bandwidth: {bandwidth['bytes_per_s'] / 1e9:.1f} GB/s (read + written)", flush=True)
    models = {}
    for slot in [s for s in SLOTS if s in args.models]:
        reps = args.reps or (QUICK_REPS if args.quick else REPS[slot])
        models[slot] = measure_model(slot, model_args(slot, args), device, reps, bandwidth["bytes_per_s"])
        gc.collect()
    gpt2 = [slot for slot in models if slot != "mlp"]
    probed = None
    if gpt2 and not args.no_probe:
        print(f"[probe] GPT-2 {gpt2[-1]}", flush=True)
        probed = probe_cost(gpt2[-1], model_args(gpt2[-1], args), device, args.probe_batches, 2 if args.quick else 3)
    if hasattr(os, "getloadavg"):
        info["loadavg_end"] = os.getloadavg()
    config = {k: v for k, v in vars(args).items() if k not in ("out", "plot", "from_json")}
    config.update(eps=EPS, p=2, alpha=0.5, probe_eps=PROBE_EPS, sizes=QUICK_SIZES if args.quick else SIZES, mlp=MLP)
    return {"config": config, "machine": info, "bandwidth": bandwidth, "models": models, "probe": probed}


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.from_json:
        with open(args.from_json) as f:
            result = json.load(f)
    else:
        result = run(args)
    print()
    print(tables(result))
    machine = result["machine"]
    print(f"\nload average: start {machine.get('loadavg_start')}, end {machine.get('loadavg_end')}")
    if args.out and not args.from_json:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    if args.plot:
        plot(result, args.plot)
    return result


if __name__ == "__main__":
    main()
