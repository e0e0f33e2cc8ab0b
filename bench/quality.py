"""Training quality of CM against tuned Muon, per corpus and model size (issues 5, 19).

    python bench/quality.py                                    # the README's run (docs topics)
    python bench/quality.py --corpus c-headers --out bench/results/quality_c-headers_demo
    python bench/quality.py --data my.txt --size 4x --optimizers cm muon --seeds 0 1 2
    python bench/quality.py --seeds --optimizers cm muon muon-per-head  # screen: sweep only

Optimizers are ``cm_triton.demo``'s names (``demo.OPTIMIZERS``): ``cm`` (CM on attention, Muon
on the MLP, AdamW on embeddings/head/norms), its variants (``cm-isotropic``, ``cm-per-query``,
``cm-damp1e-3``, ``cm-damp1e-1``, ``cm-pre``, ``cm-post``, ``cm-frob``), ``muon-per-head``
(CM's groups with whitening="none": each head orthogonalised alone), ``muon`` (Muon on every
hidden matrix, attention included) and ``adamw``.

1. Sweep: every optimizer at every rate of its grid (``--grid NAME=LR,LR`` replaces one), on
   a seed kept out of the final runs (``--sweep-seed``), for the final number of steps; where
   the best rate is the grid's smallest or largest, the next rate beyond it is tried
   (``--max-extend`` times at most). The rate with the lowest final validation loss is kept.
   The whole grid is reported, with whether its best rate is interior.
2. Final: every ``--finalists`` optimizer (default: all) at its kept rate, for every seed in
   ``--seeds`` (none: the sweep alone, a screen). A seed fixes the initial weights and the
   order of the training batches, so runs with the same seed differ only in the optimizer.
3. Paired differences ``a - b`` seed by seed, with the 95% t-interval of their mean and its
   half-width t * sd / sqrt(n), the smallest mean difference this many seeds with this spread
   tells from zero, at equal steps (the final validation loss) and at equal time: for each
   seed, both runs' validation loss interpolated (linearly, in training seconds) at the
   shorter run's total training time. Training seconds exclude the evaluations.

Writes ``OUT/quality.md`` (tables), ``OUT/quality.json`` (every run, curves of (step, training
seconds, val loss) included) and ``OUT/quality_val_loss.png`` (validation loss against steps
and against training time). Runs go ``--jobs`` at a time, each on ``--threads`` torch threads.
``--cache DIR`` records each finished run and reads it back in a later invocation (clear it
after changing the code).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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
GRIDS = {n: (0.01, 0.02, 0.04) for n in OPTIMIZERS}
GRIDS["adamw"] = (1.5e-3, 3e-3, 6e-3)
DEFAULT_OPTIMIZERS = ("cm", "cm-isotropic", "cm-per-query", "muon", "adamw")
BASELINE = "muon"


# -- statistics ---------------------------------------------------------------------------
def t_cdf(x: float, df: int) -> float:
    """Student's t distribution function, by Simpson's rule on the density (to ~1e-10)."""
    if x < 0:
        return 1.0 - t_cdf(-x, df)
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def pdf(t: float) -> float:
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    n = 2000  # even
    h = x / n
    s = pdf(0.0) + pdf(x) + sum((4 if i % 2 else 2) * pdf(i * h) for i in range(1, n))
    return 0.5 + s * h / 3


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (bisection)."""
    if not 0.5 <= p < 1 or df < 1:
        raise ValueError(f"need 0.5 <= p < 1 and df >= 1, got p={p}, df={df}")
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2 * hi
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def t_interval(xs: list[float], level: float = 0.95) -> dict:
    """Mean, sample std, and the ``level`` t-interval of the mean of ``xs``; ``half_width`` =
    t * sd / sqrt(n) is also the smallest |mean| the interval tells from zero at this spread.
    ``None`` for the interval with fewer than two values."""
    n = len(xs)
    mean = statistics.fmean(xs)
    if n < 2:
        return {"n": n, "mean": mean, "sd": 0.0, "t": None, "half_width": None, "low": None,
                "high": None}  # fmt: skip
    sd = statistics.stdev(xs)
    t = t_quantile(0.5 + level / 2, n - 1)
    hw = t * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "t": t, "half_width": hw, "low": mean - hw,
            "high": mean + hw}  # fmt: skip


def value_at_time(timed_curve: list, seconds: float) -> float | None:
    """Validation loss at ``seconds`` of training: linear between the curve's (step, seconds,
    val) points; ``None`` outside them (no point before the first evaluation)."""
    pts = [(float(s), float(v)) for _, s, v in timed_curve]
    for (s0, v0), (s1, v1) in zip(pts, pts[1:]):
        if s0 <= seconds <= s1:
            return v0 if s1 == s0 else v0 + (v1 - v0) * (seconds - s0) / (s1 - s0)
    if pts and seconds == pts[0][0]:
        return pts[0][1]
    return None


def total_seconds(run: dict) -> float:
    return float(run["timed_curve"][-1][1])


def equal_time(run_a: dict, run_b: dict) -> tuple[float, float | None, float | None]:
    """The common time T = the shorter run's total training time, and both runs' val loss
    at T (the shorter one's is its final loss)."""
    t = min(total_seconds(run_a), total_seconds(run_b))
    return t, value_at_time(run_a["timed_curve"], t), value_at_time(run_b["timed_curve"], t)


# -- runs ---------------------------------------------------------------------------------
def data_label(data: str | None, corpus: str) -> str:
    """The data's name in cache keys and reports: the corpus, or the file's name and hash."""
    if data is None:
        return corpus
    digest = hashlib.sha1(Path(data).read_bytes()).hexdigest()[:10]
    return f"{Path(data).name}-{digest}"


TRAIN_DEFAULTS = {"schedule": "constant", "warmup": 0.0, "cooldown": 0.2, "weight_decay": 0.0}


def run_key(name: str, lr: float, seed: int, cfg: dict) -> str:
    key = (f"{name}-lr{lr!r}-seed{seed}-steps{cfg['steps']}-every{cfg['eval_every']}-"
           f"{cfg['label']}-{cfg['size']}")  # fmt: skip
    train = cfg.get("train", {})  # schedule and weight decay: only where they differ from
    if train and train != TRAIN_DEFAULTS:  # constant, no decay, so older runs' keys hold
        key += "-" + "-".join(f"{k}{v}" for k, v in sorted(train.items()))
    return key


def run_one(job: tuple[str, float, int, dict]) -> dict:
    """Train one (optimizer, lr, seed) in this process; returns ``demo.train``'s record.

    With a cache directory, a run already recorded there is read back instead of trained
    (``"cached": True``), and a new run is recorded.
    """
    name, lr, seed, cfg = job
    cache = cfg["cache"]
    path = None if cache is None else Path(cache) / f"{run_key(name, lr, seed, cfg)}.json"
    if path is not None and path.is_file():
        return {**json.loads(path.read_text()), "cached": True}
    torch.set_num_threads(cfg["threads"])
    argv = ["--optimizer", name, "--lr", repr(lr), "--seed", str(seed), "--size", cfg["size"],
            "--steps", str(cfg["steps"]), "--eval-every", str(cfg["eval_every"])]  # fmt: skip
    for k, v in cfg.get("train", {}).items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    args = demo.parse_args(argv)
    block = demo.SIZES[cfg["size"]].block_size
    train_data, val_data = demo.load_bytes(cfg["data"], block, cfg["corpus"])
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


def grid_status(sweep: list[dict], name: str) -> str:
    """Whether the best rate of ``name``'s sweep is bracketed by worse rates on both sides."""
    runs = sorted((r for r in sweep if r["optimizer"] == name), key=lambda r: r["lr"])
    if len(runs) == 1:
        return "one rate: not tuned"
    best = min(range(len(runs)), key=lambda i: runs[i]["final_val_loss"])
    return "interior" if 0 < best < len(runs) - 1 else "edge: not bracketed"


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
            "train_seconds": [total_seconds(r) for r in runs],
            "tokens_per_s_mean_std": mean_std([r["tokens_per_s"] for r in runs]),
        }
    return {"best_lr": {n: r["lr"] for n, r in best.items()}, "stats": stats}


def paired(stats: dict, a: str, b: str) -> tuple[list[float], float, float] | None:
    """Seed-by-seed ``a - b`` final validation loss, its mean and sample std."""
    if a not in stats or b not in stats or stats[a]["seeds"] != stats[b]["seeds"]:
        return None
    diffs = [x - y for x, y in zip(stats[a]["val"], stats[b]["val"])]
    return (diffs, *mean_std(diffs))


def paired_equal_time(final: list[dict], a: str, b: str) -> dict | None:
    """Seed-by-seed ``a - b`` validation loss at each seed's common time (``equal_time``)."""
    runs = {(r["optimizer"], r["seed"]): r for r in final}
    seeds = sorted(r["seed"] for r in final if r["optimizer"] == a)
    if not seeds or seeds != sorted(r["seed"] for r in final if r["optimizer"] == b):
        return None
    per_seed = []
    for s in seeds:
        t, va, vb = equal_time(runs[(a, s)], runs[(b, s)])
        if va is None or vb is None:
            return None
        per_seed.append({"seed": s, "seconds": t, "a": va, "b": vb, "diff": va - vb})
    return {"per_seed": per_seed, **t_interval([p["diff"] for p in per_seed])}


def comparisons(finalists: list[str], baseline: str) -> list[tuple[str, str]]:
    """Every finalist against the baseline, then cm against every other finalist."""
    pairs = [(n, baseline) for n in finalists if n != baseline and baseline in finalists]
    if "cm" in finalists:
        pairs += [("cm", n) for n in finalists if n not in ("cm", baseline)]
    return pairs


def comparison_stats(final: list[dict], stats: dict, pairs: list[tuple[str, str]]) -> list:
    out = []
    for a, b in pairs:
        pd = paired(stats, a, b)
        if pd is None:
            continue
        out.append({"a": a, "b": b, "steps": {"per_seed": pd[0], **t_interval(pd[0])},
                    "time": paired_equal_time(final, a, b)})  # fmt: skip
    return out


# -- report -------------------------------------------------------------------------------
def _ci(c: dict) -> str:
    if c["half_width"] is None:
        return f"{c['mean']:+.4f} (one seed: no interval)"
    return (f"{c['mean']:+.4f} ± {c['sd']:.4f} | [{c['low']:+.4f}, {c['high']:+.4f}] | "
            f"{c['half_width']:.4f}")  # fmt: skip


def report(meta: dict, sweep: list[dict], summary: dict, comps: list[dict]) -> str:
    grid_names = list(dict.fromkeys(r["optimizer"] for r in sweep))
    stats = summary["stats"]
    width = max(sum(r["optimizer"] == n for r in sweep) for n in grid_names)
    lines = [
        f"# Training quality on {meta['data']}, {meta['size']} model: " + ", ".join(grid_names),
        "",
        f"- Date: {meta['date']}; device: {meta['device']}",
        f"- Versions: Python {meta['python']}, torch {meta['torch']}, cm_triton {meta['git']}",
        f"- Command: `{meta['command']}`: {meta['runs']} training runs, "
        f"{meta['train_minutes']:.0f} min of training in all ({meta['reused']} runs read back "
        "from the cache an earlier invocation wrote)",
        f"- Model: `cm_triton.demo` GPT, size `{meta['size']}` ({meta['model']}, "
        f"{meta['params'] / 1e6:.2f}M parameters), batch 16 x {meta['block']} bytes.",
        f"- Data: {meta['data_text']} ({meta['data_bytes'] / 1e6:.2f} MB; last 10% held out).",
        f"- {meta['steps']} steps, validation loss (nats/byte) on the same "
        f"{meta['eval_batches']} held-out batches every {meta['eval_every']} steps.",
        f"- {meta['jobs']} run(s) at a time, {meta['threads']} torch thread(s) each, on a machine "
        "shared with other work: training seconds (evaluations excluded) are per run under "
        "that sharing, not a speed benchmark.",
        "",
        f"## 1. Learning-rate sweep (seed {meta['sweep_seed']}, final validation loss)",
        "",
        "The matrix lr (AdamW's lr for `adamw`); embeddings, head and norms use AdamW at "
        f"{demo.ADAMW_LR} for the others. Grids step by factors of 2; where the best rate "
        f"was at an edge, the grid was extended by one more rate (up to {meta['max_extend']} "
        "times). Best per optimizer in bold; the last column says whether it is bracketed.",
        "",
        "| optimizer | " + " | ".join(f"lr {i + 1}: val loss" for i in range(width)) + " | best |",
        "|---|" + "---|" * (width + 1),
    ]
    for name in grid_names:
        cells = []
        for r in sorted((r for r in sweep if r["optimizer"] == name), key=lambda r: r["lr"]):
            cell = f"{r['lr']:g}: {r['final_val_loss']:.4f}"
            cells.append(f"**{cell}**" if r["lr"] == summary["best_lr"][name] else cell)
        cells += [""] * (width - len(cells))
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {grid_status(sweep, name)} |")
    if not stats:
        lines += ["", "A screen: no final seeds were run.", ""]
        lines += [f"![validation loss]({meta['plot']})", ""]
        return "\n".join(lines)
    lines += [
        "",
        f"## 2. Final runs at the best lr, seeds {meta['seeds']}",
        "",
        "| optimizer | lr | final val loss, mean ± std | per seed "
        "| training s, mean (min–max) | ms/step |",
        "|---|---|---|---|---|---|",
    ]
    for name, s in sorted(stats.items(), key=lambda kv: kv[1]["val_mean_std"][0]):
        m, sd = s["val_mean_std"]
        per_seed = ", ".join(f"{v:.4f}" for v in s["val"])
        ts = s["train_seconds"]
        secs = f"{statistics.fmean(ts):.0f} ({min(ts):.0f}–{max(ts):.0f})"
        ms = 1000 * statistics.fmean(ts) / meta["steps"]
        lines.append(f"| {name} | {s['lr']:g} | {m:.4f} ± {sd:.4f} | {per_seed} | {secs} "
                     f"| {ms:.0f} |")  # fmt: skip
    lines += ["", "Std is the sample standard deviation over seeds (the seed spread).", ""]
    lines += [
        "## 3. Paired differences (same seed: same initial weights, same batches)",
        "",
        "`a − b` in nats/byte, negative: `a` lower. Mean ± sample std over seeds, the 95% "
        "t-interval of the mean, and its half-width t·sd/√n: the smallest mean difference "
        "these seeds resolve from zero at this spread. *Equal time*: for each seed, both "
        "runs' validation loss interpolated at the shorter run's total training time.",
        "",
        "| a − b | at | mean ± sd | 95% CI | resolvable | per seed |",
        "|---|---|---|---|---|---|",
    ]
    for c in comps:
        name = f"{c['a']} − {c['b']}"
        each = ", ".join(f"{x:+.4f}" for x in c["steps"]["per_seed"])
        lines.append(f"| {name} | equal steps | {_ci(c['steps'])} | {each} |")
        if c["time"] is not None:
            each = ", ".join(f"{p['diff']:+.4f} @ {p['seconds']:.0f} s"
                             for p in c["time"]["per_seed"])  # fmt: skip
            lines.append(f"| {name} | equal time | {_ci(c['time'])} | {each} |")
    lines += ["", "A CI that contains 0 is no resolvable difference.", ""]
    lines += [f"![validation loss]({meta['plot']})", ""]
    return "\n".join(lines)


def plot(runs: list[dict], path: Path, title: str) -> None:
    """Validation loss against steps (mean over seeds, min-max band) and against training
    seconds (every run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_s, ax_t) = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
    for name in dict.fromkeys(r["optimizer"] for r in runs):
        mine = [r for r in runs if r["optimizer"] == name]
        curves = [r["curve"] for r in mine]
        steps = [s for s, _ in curves[0]]
        vals = list(zip(*[[v for _, v in c] for c in curves]))
        mean = [statistics.fmean(v) for v in vals]
        (line,) = ax_s.plot(steps, mean, marker="o", ms=2.5, label=f"{name} (n={len(curves)})")
        ax_s.fill_between(steps, [min(v) for v in vals], [max(v) for v in vals],
                          color=line.get_color(), alpha=0.2)  # fmt: skip
        for i, r in enumerate(mine):
            _, secs, v = zip(*r["timed_curve"])
            ax_t.plot(secs, v, color=line.get_color(), lw=1, alpha=0.8,
                      label=name if i == 0 else None)  # fmt: skip
    ax_s.set_xlabel("step")
    ax_t.set_xlabel("training seconds (evaluations excluded)")
    ax_s.set_ylabel("validation loss (nats/byte)")
    lows = [v for r in runs for _, v in r["curve"]]
    ax_s.set_ylim(min(lows) - 0.02, min(lows) + 0.6)
    ax_s.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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


def git_version() -> str:
    import subprocess

    try:
        out = subprocess.run(["git", "-C", str(Path(__file__).parent), "describe", "--always",
                              "--dirty"], capture_output=True, text=True, timeout=10)  # fmt: skip
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _grid(text: str) -> tuple[str, tuple[float, ...]]:
    name, _, rates = text.partition("=")
    if name not in OPTIMIZERS or not rates:
        raise argparse.ArgumentTypeError(f"expected NAME=LR[,LR...] with NAME in {OPTIMIZERS}")
    try:
        lrs = tuple(float(x) for x in rates.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad rates in {text!r}") from None
    if not all(math.isfinite(x) and x > 0 for x in lrs):
        raise argparse.ArgumentTypeError(f"rates must be positive in {text!r}")
    return name, lrs


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS, default=list(DEFAULT_OPTIMIZERS))
    p.add_argument("--finalists", nargs="*", choices=OPTIMIZERS, default=None,
                   help="optimizers run on --seeds (default: all of --optimizers)")  # fmt: skip
    p.add_argument("--baseline", default=BASELINE, choices=OPTIMIZERS)
    p.add_argument("--data", default=None, help="UTF-8 text file (default: --corpus)")
    p.add_argument("--corpus", default="topics", choices=demo.CORPORA)
    p.add_argument("--size", default="demo", choices=demo.SIZES)
    p.add_argument("--grid", type=_grid, action="append", default=[], metavar="NAME=LR,LR",
                   help="replace one optimizer's lr grid (repeatable)")  # fmt: skip
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--schedule", default="constant", choices=demo.SCHEDULES)
    p.add_argument("--warmup", type=float, default=0.0, help="a fraction of --steps")
    p.add_argument("--cooldown", type=float, default=0.2, help="wsd: a fraction of --steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
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
    if args.finalists is None:
        args.finalists = list(args.optimizers)
    if not set(args.finalists) <= set(args.optimizers):
        p.error("--finalists must be among --optimizers (their rates come from the sweep)")
    if args.data is not None and not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    start = time.perf_counter()
    label = data_label(args.data, args.corpus)
    cfg = {"steps": args.steps, "eval_every": args.eval_every, "threads": args.threads,
           "cache": args.cache, "data": args.data, "corpus": args.corpus, "size": args.size,
           "label": label, "train": {"schedule": args.schedule, "warmup": args.warmup,
                                      "cooldown": args.cooldown,
                                      "weight_decay": args.weight_decay}}  # fmt: skip
    grids = {**GRIDS, **{n: lrs for n, lrs in args.grid}}
    chosen = {n: grids[n] if n in dict(args.grid) else grids[n][: args.grid_size]
              for n in args.optimizers}  # fmt: skip
    # In --optimizers order: list the slowest (CM) first so the last jobs are short ones.
    sweep = run_all([(n, lr, args.sweep_seed, cfg) for n in args.optimizers for lr in chosen[n]],
                    args.jobs)  # fmt: skip
    for _ in range(args.max_extend):  # a best rate at the grid's edge is not bracketed yet
        extra = edge_extensions(sweep)
        if not extra:
            break
        sweep += run_all([(n, lr, args.sweep_seed, cfg) for n, lr in extra], args.jobs)
    summary = summarize(sweep, [])
    final_jobs = [(n, summary["best_lr"][n], s, cfg) for n in args.finalists for s in args.seeds]
    final = run_all(final_jobs, args.jobs)
    summary = summarize(sweep, final)
    comps = comparison_stats(final, summary["stats"], comparisons(args.finalists, args.baseline))
    summary["comparisons"] = comps
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    png = out / "quality_val_loss.png"
    size = demo.SIZES[args.size]
    train_data, val_data = demo.load_bytes(args.data, size.block_size, args.corpus)
    if args.data is not None:
        data_text = f"the UTF-8 file `{args.data}` (`{label}`)"
    elif args.corpus == "topics":
        data_text = "bytes of `pydoc_data.topics` (CPython's documentation topics, English)"
    else:
        data_text = ("bytes of the C API headers of this Python (`*.h` under "
                     "`sysconfig.get_paths()['include']`, in the order of their relative "
                     "paths): C code")  # fmt: skip
    best_runs = [min((r for r in sweep if r["optimizer"] == n), key=lambda r: r["final_val_loss"])
                 for n in args.optimizers]  # fmt: skip
    shown = final if final else best_runs
    what = "mean over seeds, min-max band" if final else "screen: best rate, sweep seed"
    plot(shown, png, f"{args.size} GPT on {label}: {what}")
    meta = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device_name(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "git": git_version(),
        "command": " ".join(["python bench/quality.py", *(sys.argv[1:] if argv is None else argv)]),
        "minutes": (time.perf_counter() - start) / 60,
        "train_minutes": sum(r["seconds"] for r in sweep + final) / 60,
        "data": label,
        "data_text": data_text,
        "data_bytes": len(train_data) + len(val_data),
        "size": args.size,
        "model": ", ".join(f"{k} {v}" for k, v in vars(size).items()),
        "params": sum(p.numel() for p in demo.GPT(size).parameters()),
        "block": size.block_size,
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
    (out / "quality.md").write_text(report(meta, sweep, summary, comps))
    (out / "quality.json").write_text(
        json.dumps({"meta": meta, "summary": summary, "sweep": sweep, "final": final}, indent=1)
    )
    print((out / "quality.md").read_text())
    return summary


if __name__ == "__main__":
    main(sys.argv[1:])
