"""Each rank's optimizer-step flops under DDP, with the step split over ranks
(``replicated="split"``, the default with a process group) against one process.

    python bench/ddp_flops.py            # writes bench/results/ddp_flops.md

A Llama-shaped tiny model (4 blocks, d 256, 8 query / 2 KV heads of 32, SwiGLU MLP 768,
vocabulary 1024, untied head) is wrapped in ``DistributedDataParallel`` on gloo (CPU), at
world sizes 2 and 4 (workers forked by ``tests/dist_harness.py``). Every rank gets the same
random gradients (what DDP's all_reduce leaves), and the second ``opt.step()`` is profiled
with ``torch.profiler.profile(with_flops=True)``: the flops are the sum of ``evt.flops`` over
the step's events (the profiler counts mm / addmm / bmm / baddbmm as 2 m n k from their shapes,
and one flop per element of mul / add; eigh and reductions count nothing), so they are
deterministic. "one process": the same optimizer with no process group. The split step also
computes every layer's momentum on every rank (elementwise) and AdamW (embedding, head,
norms) in full; the all_gather and its padding add no flops.
"""

from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from dist_harness import DistPool, step_flops  # noqa: E402
from step_costs import Llama  # noqa: E402

from cm_triton import CompositionalMuon, param_groups  # noqa: E402

CFG = dict(n=4, d=256, hq=8, hkv=2, hidden=768, vocab=1024)  # heads of 32


def _grads(model: nn.Module, gen: torch.Generator) -> None:
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen) * 0.01


def measure(cfg: dict, replicated: str | None, steps: int = 2, **opt_kw) -> dict:
    """One rank's (or, ``replicated=None``, one process's) flops of the last of ``steps``
    optimizer steps, with the step's collectives and bytes."""
    torch.manual_seed(0)
    model = Llama(**cfg)
    kw = dict(lr=0.02, **opt_kw)
    if replicated is None:
        opt = CompositionalMuon(param_groups(model), **kw)
    else:
        from torch.nn.parallel import DistributedDataParallel as DDP

        model = DDP(copy.deepcopy(model))
        opt = CompositionalMuon(param_groups(model), process_group=dist.group.WORLD,
                                replicated=replicated, **kw)  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps - 1):
        _grads(model, gen)
        opt.step()
    _grads(model, gen)
    flops = step_flops(opt.step)
    _grads(model, gen)  # the tests' cheaper count (FlopCounterMode) agrees: one more step
    assert step_flops(opt.step, "dispatch")["matmul"] == flops["matmul"]
    comm = opt.comm
    return {
        **flops,
        "counts": {} if comm is None else dict(comm.counts),
        "sent": 0.0 if comm is None else sum(comm.sent.values()),
        "plans": {} if comm is None else dict(comm.plans),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ddp_flops.md"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    one = measure(CFG, None)
    rows = [("1 (one process)", [one])]
    for world in (2, 4):
        with DistPool(world, timeout_s=600) as pool:
            rows.append((f"{world}, split", pool.run(measure, CFG, "split")))
            if world == 2:
                rows.append((f"{world}, every_rank", pool.run(measure, CFG, "every_rank")))
    lines = [
        "| world, replicated | matmul MFLOP per rank, max (min) | ratio to one process "
        "(matmul) | all MFLOP per rank, max | ratio (all) | collectives per step | sent "
        "per rank, KB |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, res in rows:
        mm = [r["matmul"] for r in res]
        tot = [r["total"] for r in res]
        calls = ", ".join(f"{k} {v}" for k, v in sorted(res[0]["counts"].items())) or "none"
        sent = max(r["sent"] for r in res) / 1e3
        lines.append(
            f"| {name} | {max(mm) / 1e6:.1f} ({min(mm) / 1e6:.1f}) | "
            f"{max(mm) / one['matmul']:.3f} | {max(tot) / 1e6:.1f} | "
            f"{max(tot) / one['total']:.3f} | {calls} | {sent:.1f} |"
        )
    c = CFG
    n_params = sum(p.numel() for p in Llama(**CFG).parameters())
    ddp_kb = {w: 2 * (w - 1) / w * 4 * n_params / 1e3 for w in (2, 4)}
    text = "\n".join(
        [
            "# Optimizer-step flops per rank under DDP: the step split over ranks",
            "",
            f"`python bench/ddp_flops.py`, {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, "
            f"{platform.machine()} CPU with {torch.get_num_threads()} thread per process on a "
            f"2-core machine, gloo; flops from `torch.profiler.profile(with_flops=True)` (the sum "
            f"of `evt.flops` over the events of one `opt.step()`, deterministic), not timings.",
            f"Model: Llama-shaped (`tests/step_costs.Llama`), {c['n']} blocks, d {c['d']}, "
            f"{c['hq']} query / {c['hkv']} KV heads of {c['d'] // c['hq']}, SwiGLU MLP "
            f"{c['hidden']}, vocabulary {c['vocab']}; "
            f"fp32, CM defaults (lr 0.02), `param_groups(ddp)`, "
            f"`process_group=dist.group.WORLD`.",
            "",
            *lines,
            "",
            "Batches: QK and OV (4 layers each), Muon gate+up (8 matrices of 768 x 256) and down "
            "(4 of 256 x 768); each is split into contiguous chunks of ceil(L / W) layers, one "
            "all_gather of the new weights per batch; one all_reduce agrees on every finite "
            "flag of the step (gradients and results). The rest of a split rank's flops are the "
            "elementwise momentum of every layer (computed on every rank, so nothing more is "
            "sent) and AdamW on the embedding, head and norms (not split). `every_rank`: the "
            "old behaviour, every rank computes the whole step, no collective.",
            "",
            "Sent: what `Comm` counts, ring algorithms (an all_gather sends (W - 1) times the "
            "rank's padded chunk, an all_reduce 2 (W - 1) / W of its buffer). For scale, DDP's "
            f"own gradient all_reduce of this model ({n_params / 1e6:.2f} M fp32 parameters) "
            f"sends {ddp_kb[2]:.1f} KB per rank at world 2 and {ddp_kb[4]:.1f} KB at world 4 "
            "every step.",
            "",
        ]
    )
    Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
