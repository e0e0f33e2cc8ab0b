"""Soak: the demo model for many steps at a high learning rate; any NaN/Inf? max weight norm?

    python bench/soak.py --steps 10000 --lr 0.1 --batch-size 8 --threads 1 \
        --out bench/results/soak.md

Not part of CI (minutes to hours). Writes a small markdown report with the command and the
numbers: non-finite losses or weights seen (step of the first, if any), the largest Frobenius
norm of any weight matrix over the run, and the loss at checkpoints.
"""

from __future__ import annotations

import argparse
import math
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from cm_triton.demo import GPT, GPTConfig, batch, load_bytes, make_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--lr", type=float, default=0.1)  # 5x the demo's default
    p.add_argument("--optimizer", default="cm")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--report-every", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train, _ = load_bytes(None, GPTConfig.block_size)
    model = GPT(GPTConfig())
    opt = make_optimizer(args.optimizer, model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    first_bad, max_norm, rows = None, 0.0, []
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = batch(train, args.batch_size, GPTConfig.block_size, gen, "cpu")
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        norms = [w.detach().norm().item() for w in model.parameters() if w.ndim == 2]
        finite = math.isfinite(loss.item()) and all(math.isfinite(n) for n in norms)
        if not finite and first_bad is None:
            first_bad = step
            break
        max_norm = max(max_norm, *norms)
        if step % args.report_every == 0:
            rows.append((step, loss.item(), max(norms)))
            print(
                f"step {step}: loss {loss.item():.4f}  max weight norm {max(norms):.2f}", flush=True
            )
    secs = time.perf_counter() - t0
    lines = [
        f"# Soak: {args.optimizer}, lr {args.lr}, {args.steps} steps",
        "",
        f"- Date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC; "
        f"{platform.processor() or platform.machine()}, {args.threads} thread(s); "
        f"torch {torch.__version__}",
        f"- Command: `python bench/soak.py --steps {args.steps} --lr {args.lr} --optimizer "
        f"{args.optimizer} --batch-size {args.batch_size} --threads {args.threads}`",
        "- Non-finite loss or weight: "
        + ("none" if first_bad is None else f"first at step {first_bad}"),
        f"- Largest Frobenius norm of any weight matrix over the run: {max_norm:.3f}",
        f"- Wall time: {secs / 60:.1f} min",
        "",
        "| step | train loss | max weight norm |",
        "|---|---|---|",
        *(f"| {s} | {lo:.4f} | {n:.3f} |" for s, lo, n in rows),
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    if args.out:
        Path(args.out).write_text(report)


if __name__ == "__main__":
    main()
