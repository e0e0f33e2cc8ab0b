"""Training quality of CM against Muon and AdamW on the demo model, several seeds (issue 5).

    python bench/quality.py            # the committed run: sweep, then 3 seeds each

Four optimizers, as in ``cm_triton.demo``: ``cm`` (CM on attention, Muon on the MLP, AdamW on
embeddings/head/norms), ``cm-isotropic`` (the same with the scalar roots of spec §4.4),
``muon`` (Muon on every hidden matrix, attention included; AdamW on the rest) and ``adamw``
(AdamW everywhere).

1. Sweep: every optimizer at every rate of its grid, on a seed kept out of the final runs
   (``--sweep-seed``), for the final number of steps; where the best rate is the grid's
   smallest or largest, the next rate beyond it is tried (``--max-extend`` times at most).
   The rate with the lowest final validation loss is kept.
2. Final: every optimizer at its kept rate, for every seed in ``--seeds``. A seed fixes the
   initial weights and the order of the training batches, so runs with the same seed differ
   only in the optimizer: the CM - Muon difference is also reported seed by seed (paired).

Writes ``OUT/quality.md`` (tables), ``OUT/quality.json`` (every run, curves included) and
``OUT/quality_val_loss.png`` (validation loss, mean over seeds, with the min-max band).
Runs go ``--jobs`` at a time, each on ``--threads`` torch threads. ``--cache DIR`` records
each finished run and reads it back in a later invocation (clear it after changing the code).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cm_triton import demo

OPTIMIZERS = demo.OPTIMIZERS
# Matrix lr grids, factor-2 steps around the demo's defaults (bench/results/demo_lr_sweep.md).
GRIDS = {
    "cm": (0.01, 0.02, 0.04),
    "cm-isotropic": (0.01, 0.02, 0.04),
    "cm-release": (0.01, 0.02, 0.04),
    "cm-per-query": (0.01, 0.02, 0.04),
    "muon": (0.01, 0.02, 0.04),
    "adamw": (1.5e-3, 3e-3, 6e-3),
}


def run_key(name: str, lr: float, seed: int, steps: int, eval_every: int) -> str:
    return f"{name}-lr{lr!r}-seed{seed}-steps{steps}-every{eval_every}"


def run_one(job: tuple[str, float, int, int, int, int, str | None]) -> dict:
    """Train one (optimizer, lr, seed) in this process; returns ``demo.train``'s record.

    With a cache directory, a run already recorded there is read back instead of trained
    (``"cached": True``), and a new run is recorded.
    """
    name, lr, seed, steps, eval_every, threads, cache = job
    path = (
        None
        if cache is None
        else Path(cache) / f"{run_key(name, lr, seed, steps, eval_every)}.json"
    )
    if path is not None and path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    torch.set_num_threads(threads)
    argv = ["--optimizer", name, "--lr", repr(lr), "--seed", str(seed), "--steps", str(steps)]
    args = demo.parse_args([*argv, "--eval-every", str(eval_every)])
    train_data, val_data = demo.load_bytes(None, demo.GPTConfig.block_size)
    result = {**demo.train(name, args, train_data, val_data), "lr": lr, "seed": seed}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result))
    return {**result, "cached": False}


def edge_extensions(sweep: list[dict]) -> list[tuple[str, float]]:
    """``(optimizer, lr)`` to try next where the best rate is at the edge of what was swept:
    half the smallest rate or twice the largest (the grids step by factors of 2)."""
    extra = []
    for name in dict.fromkeys(r["optimizer"] for r in sweep):
        lrs = sorted(r["lr"] for r in sweep if r["optimizer"] == name)
        best = min((r for r in sweep if r["optimizer"] == name), key=lambda r: r["final_val_loss"])
        if len(lrs) > 1 and best["lr"] == lrs[0]:
            extra.append((name, lrs[0] / 2))
        elif len(lrs) > 1 and best["lr"] == lrs[-1]:
            extra.append((name, lrs[-1] * 2))
    return extra


def run_all(jobs: list[tuple], n_parallel: int) -> list[dict]:
    """Run jobs ``n_parallel`` at a time in fresh processes; results in job order."""
    if n_parallel == 1:
        return [run_one(j) for j in jobs]
    with mp.get_context("spawn").Pool(n_parallel, maxtasksperchild=1) as pool:
        return pool.map(run_one, jobs, chunksize=1)


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summarize(sweep: list[dict], final: list[dict]) -> dict:
    """Best rate per optimizer, and per-optimizer final statistics."""
    best = {n: min((r for r in sweep if r["optimizer"] == n), key=lambda r: r["final_val_loss"])
            for n in {r["optimizer"] for r in sweep}}  # fmt: skip
    stats = {}
    for name in dict.fromkeys(r["optimizer"] for r in final):
        runs = sorted((r for r in final if r["optimizer"] == name), key=lambda r: r["seed"])
        stats[name] = {
            "lr": runs[0]["lr"],
            "seeds": [r["seed"] for r in runs],
            "val": [r["final_val_loss"] for r in runs],
            "val_mean_std": mean_std([r["final_val_loss"] for r in runs]),
            "tokens_per_s_mean_std": mean_std([r["tokens_per_s"] for r in runs]),
        }
    return {"best_lr": {n: r["lr"] for n, r in best.items()}, "stats": stats}


def paired(stats: dict, a: str, b: str) -> tuple[list[float], float, float] | None:
    """Seed-by-seed ``a - b`` final validation loss, its mean and sample std."""
    if a not in stats or b not in stats or stats[a]["seeds"] != stats[b]["seeds"]:
        return None
    diffs = [x - y for x, y in zip(stats[a]["val"], stats[b]["val"])]
    return (diffs, *mean_std(diffs))


def report(meta: dict, sweep: list[dict], summary: dict) -> str:
    grid_names = list(dict.fromkeys(r["optimizer"] for r in sweep))
    stats = summary["stats"]
    width = max(sum(r["optimizer"] == n for r in sweep) for n in grid_names)
    lines = [
        "# Training quality: " + " vs ".join(grid_names) + " (demo model)",
        "",
        f"- Date: {meta['date']}; device: {meta['device']}",
        f"- Versions: Python {meta['python']}, torch {meta['torch']}",
        f"- Command: `{meta['command']}`: {meta['runs']} training runs, "
        f"{meta['train_minutes']:.0f} min of training in all ({meta['reused']} runs read back "
        "from the cache an earlier invocation of the same command wrote)",
        f"- Model and data: `cm_triton.demo` defaults (4-layer GPT, d = 128, GQA 4/2 heads, "
        f"0.81M parameters, bytes of `pydoc_data.topics`, batch 16 x 128 bytes), "
        f"{meta['steps']} steps, validation loss (nats/byte) on the same "
        f"{meta['eval_batches']} held-out batches every {meta['eval_every']} steps.",
        f"- {meta['jobs']} runs at a time, {meta['threads']} torch thread(s) each: tokens/s are "
        f"per run under that sharing, comparable between rows, not a speed benchmark.",
        "",
        f"## 1. Learning-rate sweep (seed {meta['sweep_seed']}, final validation loss)",
        "",
        "The matrix lr (AdamW's lr for `adamw`); embeddings, head and norms use AdamW at "
        f"{demo.ADAMW_LR} for the others. Grids step by factors of 2; where the best rate "
        f"was at an edge, the grid was extended by one more rate (up to {meta['max_extend']} "
        "times). Best per optimizer in bold.",
        "",
        "| optimizer | " + " | ".join(f"lr {i + 1}: val loss" for i in range(width)) + " |",
        "|---|" + "---|" * width,
    ]
    for name in grid_names:
        cells = []
        for r in sorted((r for r in sweep if r["optimizer"] == name), key=lambda r: r["lr"]):
            cell = f"{r['lr']:g}: {r['final_val_loss']:.4f}"
            cells.append(f"**{cell}**" if r["lr"] == summary["best_lr"][name] else cell)
        cells += [""] * (width - len(cells))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"## 2. Final runs at the best lr, seeds {meta['seeds']}",
        "",
        "| optimizer | lr | final val loss, mean ± std | per seed | tokens/s, mean |",
        "|---|---|---|---|---|",
    ]
    for name, s in sorted(stats.items(), key=lambda kv: kv[1]["val_mean_std"][0]):
        m, sd = s["val_mean_std"]
        per_seed = ", ".join(f"{v:.4f}" for v in s["val"])
        tps = s["tokens_per_s_mean_std"][0]
        lines.append(f"| {name} | {s['lr']:g} | {m:.4f} ± {sd:.4f} | {per_seed} | {tps:,.0f} |")
    lines += ["", "Std is the sample standard deviation over seeds.", ""]
    lines += ["## 3. Paired differences (same seed: same initial weights, same batches)", ""]
    for a, b in (("cm", "muon"), ("cm-isotropic", "muon"), ("cm", "cm-isotropic"),
                 ("cm", "adamw"), ("cm", "cm-release"), ("cm", "cm-per-query")):  # fmt: skip
        pd = paired(stats, a, b)
        if pd is not None:
            diffs, m, sd = pd
            each = ", ".join(f"{x:+.4f}" for x in diffs)
            lines.append(f"- {a} − {b}: {m:+.4f} ± {sd:.4f} nats/byte (per seed {each})")
    lines += ["", "Negative means the first optimizer reached the lower validation loss.", ""]
    lines += [f"![validation loss]({meta['plot']})", ""]
    return "\n".join(lines)


def plot(final: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for name in dict.fromkeys(r["optimizer"] for r in final):
        curves = [r["curve"] for r in final if r["optimizer"] == name]
        steps = [s for s, _ in curves[0]]
        vals = list(zip(*[[v for _, v in c] for c in curves]))
        mean = [statistics.fmean(v) for v in vals]
        (line,) = ax.plot(steps, mean, marker="o", ms=2.5, label=f"{name} (n={len(curves)})")
        ax.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals],
                        color=line.get_color(), alpha=0.2)  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_ylim(top=min(2.6, ax.get_ylim()[1]))
    ax.set_title("demo GPT on pydoc_data.topics: mean over seeds, min-max band")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def device_name() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {mp.cpu_count()} cores (CPU)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS,
                   default=[n for n in OPTIMIZERS if n != "cm-release"])  # fmt: skip
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sweep-seed", type=int, default=99)
    p.add_argument("--grid-size", type=int, default=3, help="use the first N rates of each grid")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-extend", type=int, default=2, help="edge extensions of each grid")
    p.add_argument("--cache", default=None, help="directory of finished runs to reuse")
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    if args.max_extend < 0:
        p.error("--max-extend must not be negative")
    for name in ("steps", "eval_every", "grid_size", "jobs", "threads"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.sweep_seed in args.seeds:
        p.error("--sweep-seed must not be one of --seeds (tune and measure on different seeds)")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    common = (args.steps, args.eval_every, args.threads, args.cache)
    # In OPTIMIZERS order: the slowest (CM) first, so the last jobs to finish are short ones.
    sweep_jobs = [(n, lr, args.sweep_seed, *common)
                  for n in args.optimizers for lr in GRIDS[n][: args.grid_size]]  # fmt: skip
    sweep = run_all(sweep_jobs, args.jobs)
    for _ in range(args.max_extend):  # a best rate at the grid's edge is not bracketed yet
        extra = edge_extensions(sweep)
        if not extra:
            break
        sweep += run_all([(n, lr, args.sweep_seed, *common) for n, lr in extra], args.jobs)
    summary = summarize(sweep, [])
    final_jobs = [
        (n, summary["best_lr"][n], s, *common) for n in args.optimizers for s in args.seeds
    ]
    final = run_all(final_jobs, args.jobs)
    summary = summarize(sweep, final)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "quality_val_loss.png"
    plot(final, png)
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(["python bench/quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "minutes": (time.perf_counter() - start) / 60,
        "train_minutes": sum(r["seconds"] for r in sweep + final) / 60,
        "steps": args.steps,
        "eval_every": args.eval_every,
        "eval_batches": demo.parse_args([]).eval_batches,
        "seeds": args.seeds,
        "sweep_seed": args.sweep_seed,
        "jobs": args.jobs,
        "threads": args.threads,
        "plot": png.name,
        "runs": len(sweep) + len(final),
        "max_extend": args.max_extend,
        "reused": sum(r["cached"] for r in sweep + final),
    }
    (out / "quality.md").write_text(report(meta, sweep, summary))
    (out / "quality.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "sweep": sweep, "final": final}, indent=1)
    )
    print((out / "quality.md").read_text())
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
