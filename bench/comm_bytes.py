"""Bytes a rank sends per optimizer step under FSDP2, for a Llama-7B-shaped layer at world
sizes 8 and 64: a simulation of a scale this CPU cannot run, from the optimizer's own counting.

    python bench/comm_bytes.py            # writes bench/results/comm_bytes.md (7B, FSDP2)
    python bench/comm_bytes.py --llama70b # its Llama-70B section (TP x FSDP2, HSDP)

Rank 0 of a fake process group (``torch.testing``'s "fake" backend: every collective is a
no-op) steps one sharded layer (d 4096, 32 heads of 128, MHA; SwiGLU MLP of 11008). The
collectives ``CompositionalMuon`` issues are counted by ``distributed.Comm`` with the bytes
this rank sends in each (ring algorithms: an all_reduce of S bytes sends 2 (W-1)/W S, an
all_gather of a local S sends (W-1) S, an all_to_all sends what is not its own). The signs
themselves are replaced by zeros (only their sizes matter here, and the full-size Newton-Schulz
would take minutes on this CPU). Baseline: all-gathering every matrix's update, the way an
optimizer that needs whole matrices and knows nothing of heads would.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import cm_triton.engine as engine
from cm_triton import CompositionalMuon, param_groups
from cm_triton.reference.rule import REFERENCE, Primitives

D, H, DH, FFN = 4096, 32, 128, 11008  # Llama-7B
LLAMA_70B = dict(d=8192, hq=64, hkv=8, dh=128, ffn=28672)  # 80 layers
TP_PLAN = {"q_proj": "col", "k_proj": "col", "v_proj": "col", "o_proj": "row",
           "gate_proj": "col", "up_proj": "col", "down_proj": "row"}  # fmt: skip


class Layer(nn.Module):
    def __init__(self, d: int = D, hq: int = H, hkv: int = H, dh: int = DH,
                 ffn: int = FFN) -> None:  # fmt: skip
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = hq, hkv, dh
        self.q_proj = nn.Linear(d, hq * dh, bias=False)
        self.k_proj = nn.Linear(d, hkv * dh, bias=False)
        self.v_proj = nn.Linear(d, hkv * dh, bias=False)
        self.o_proj = nn.Linear(hq * dh, d, bias=False)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.norm = nn.RMSNorm(d)

    def forward(self, x):  # pragma: no cover - never run: fully_shard wants a forward
        return x


def _zero_sign(x, coefficients=None, dtype=None, method="ns", restart=0):
    return torch.zeros_like(x, dtype=torch.float32)


def _place(layer: nn.Module, layout: str, world: int, inner: int):
    """``"fsdp"``: FSDP2 over ``world``; ``"hsdp"``: ``world / inner`` replicas x ``inner``
    shards; ``"fsdp_tp"``: FSDP2 over ``world / inner`` x tensor parallel over ``inner``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    if layout == "fsdp":
        fully_shard(layer, mesh=init_device_mesh("cpu", (world,)))
        return
    names = ("replicate", "shard") if layout == "hsdp" else ("dp", "tp")
    mesh = init_device_mesh("cpu", (world // inner, inner), mesh_dim_names=names)
    if layout == "hsdp":
        fully_shard(layer, mesh=mesh)
        return
    styles = {"col": ColwiseParallel, "row": RowwiseParallel}
    parallelize_module(layer, mesh["tp"], {n: styles[s]() for n, s in TP_PLAN.items()})
    fully_shard(layer, mesh=mesh["dp"])


def simulate(world: int, rank: int, o_sign: str, layout: str = "fsdp", inner: int = 8,
             shape: dict | None = None) -> tuple[dict, dict, float, dict]:  # fmt: skip
    """Rank ``rank``'s bytes sent, collectives and plans in one step of one layer."""
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        with torch.device("meta"):
            layer = Layer(**(shape or {}))
        _place(layer, layout, world, inner)
        layer.to_empty(device="cpu")
        with torch.no_grad():
            for p in layer.parameters():
                p.to_local().normal_()
        for p in layer.parameters():
            loc = torch.randn_like(p.to_local())
            p.grad = DTensor.from_local(loc, p.device_mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride())  # fmt: skip
        opt = CompositionalMuon(param_groups(layer), lr=1e-3, o_sign=o_sign)
        opt.step()
        # Each matrix's update all-gathered over every rank holding a different block of it.
        baseline = sum((_holders(p) - 1) * p.to_local().numel() * 4 for p in layer.parameters()
                       if p.ndim == 2)  # fmt: skip
        return dict(opt.comm.sent), dict(opt.comm.counts), baseline, dict(opt.comm.plans)
    finally:
        dist.destroy_process_group()


def _holders(p) -> int:
    """How many distinct blocks ``p`` is split into (its replicas hold the same)."""
    from torch.distributed.tensor import Replicate

    return math.prod(n for n, pl in zip(p.device_mesh.shape, p.placements)
                     if not isinstance(pl, Replicate))  # fmt: skip


def _zero_filled(real, empty_input_ok: bool = False):
    """The fake backend leaves outputs uninitialised (fill them with zeros: values do not
    matter here, but garbage could be NaN), and refuses an all_to_all whose input is empty
    while its output is not, which gloo and NCCL accept (a rank that owns no matrix of a batch
    sends nothing back)."""

    def collective(out, inp, *args, **kwargs):
        out.zero_()
        if empty_input_ok and inp.numel() == 0:
            return None
        return real(out, inp, *args, **kwargs)

    return collective


def _counting_ns(y, coefficients, reduce=None):
    """Newton-Schulz's collectives without its products: each step's ``Y Y^T`` (zeros of its
    shape) goes through ``reduce``, as the sharded O sign sends it."""
    for _ in coefficients:
        if reduce is not None:
            reduce(y.new_zeros(y.shape[0], y.shape[-2], y.shape[-2]))
    return y


def _fast() -> None:
    """Values do not matter here, only sizes: zero signs and counted Newton-Schulz."""
    import cm_triton.distributed.attention as attention

    fast = Primitives(msign=_zero_sign, phases=REFERENCE.phases)
    engine.resolve_primitives = lambda backend, device: fast
    attention.ns_iterate = _counting_ns
    dist.all_to_all_single = _zero_filled(dist.all_to_all_single, empty_input_ok=True)
    dist.all_gather_single = _zero_filled(dist.all_gather_single)


# Rank classes of a 64-rank step of one 70B layer: the three Muon matrices' owners (ranks 0,
# 1, 2), the other first-replica ranks (HSDP: the ones that send Muon blocks) and the rest.
# One representative each is simulated and every rank of a class is checked to agree on a
# second sample; the mean weighs each class by its size.
CLASSES = [((0,), 0), ((1,), 1), ((2,), 2), (tuple(range(3, 8)), 3), (tuple(range(8, 64)), 9)]
CHECK = {3: 7, 9: 63}


def _in_child(*args):
    """``simulate(*args)`` in a forked process: a 2-D mesh's slices are cached by value across
    process groups, so each simulated rank gets a process of its own."""
    import concurrent.futures
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(simulate, *args).result()


def main_70b() -> str:
    """The Llama-70B rows of comm_bytes.md: one layer at 64 ranks, TP 8 x FSDP 8 and HSDP 8 x 8,
    each O sign strategy."""
    _fast()
    rows = ["| mesh | O sign | plans | collectives per step | sent per rank, mean (max) MB | "
            "all-gather every matrix, MB | ratio (mean) |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for layout, label in (("fsdp_tp", "FSDP 8 x TP 8"), ("hsdp", "HSDP 8 x 8")):
        for o_sign in ("gather", "sharded"):
            sims = {}
            for _, rank in CLASSES:
                sims[rank] = _in_child(64, rank, o_sign, layout, 8, LLAMA_70B)
            for rank, other in CHECK.items():
                again = _in_child(64, other, o_sign, layout, 8, LLAMA_70B)
                assert again[:2] == sims[rank][:2], (layout, rank, other)
            totals = {r: sum(x[0].values()) for r, x in sims.items()}
            mean = sum(len(c) * totals[r] for c, r in CLASSES) / 64
            peak = max(totals.values())
            base = sum(len(c) * sims[r][2] for c, r in CLASSES) / 64
            kinds = sorted({k for x in sims.values() for k in x[0]})
            by_kind = {k: sum(len(c) * sims[r][0].get(k, 0) for c, r in CLASSES) / 64
                       for k in kinds}  # fmt: skip
            parts = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in by_kind.items())
            calls = ", ".join(f"{k} {v}" for k, v in sorted(sims[9][1].items()))
            plans = ", ".join(f"{k} {v}" for k, v in sorted(sims[9][3].items()))
            rows.append(f"| {label} | {o_sign} | {plans} | {calls} | {mean / 1e6:.1f} "
                        f"({peak / 1e6:.1f}): {parts} | {base / 1e6:.1f} | "
                        f"{mean / base:.2f} |")  # fmt: skip
    shape = LLAMA_70B
    return "\n".join([
        "## Llama-70B-shaped layer on 2-D meshes (64 ranks)",
        "",
        f"`python bench/comm_bytes.py --llama70b`, {time.strftime('%Y-%m-%d')}, torch "
        f"{torch.__version__}: a simulation (fake process group, one rank of each class in "
        "turn), not a measurement on a cluster.",
        f"Layer: d {shape['d']}, {shape['hq']} query heads and {shape['hkv']} KV heads of "
        f"{shape['dh']}, SwiGLU MLP {shape['ffn']}; fp32 optimizer traffic; a model of 80 such "
        "layers sends 80 times this per step (owners rotate over the layers, so the max "
        "evens out).",
        "",
        *rows,
        "",
        "FSDP 8 x TP 8: tensor parallel gives each rank group 8 query heads and 1 KV head, and",
        "FSDP's rows then cut that KV head in 8: the pairs are gathered over FSDP's dimension",
        "only (`heads_gather`: the TP rank's heads are whole there), never over all 64 ranks;",
        "the hybrid O sign spans TP's 8 ranks. HSDP 8 x 8: within a replica as FSDP 8 (QK local,",
        "OV's dh x dh Grams all-reduced), the replicas repeat the attention legs; Muon's owners",
        "rotate over all 64 ranks and only the first replica sends blocks. Baseline: all-",
        "gathering every matrix's update over the ranks holding a different block of it.",
        "",
    ])  # fmt: skip


def main() -> None:
    _fast()
    rows = ["| world | O sign | collectives per step | sent per rank, mean (max) MB | all-gather "
            "every matrix, MB | ratio (mean) |", "|---|---|---|---|---|---|"]  # fmt: skip
    for world in (8, 64):
        for o_sign in ("gather", "sharded"):
            sims = [simulate(world, r, o_sign) for r in range(world)]
            totals = [sum(x[0].values()) for x in sims]
            mean, peak = sum(totals) / world, max(totals)
            base = sum(x[2] for x in sims) / world
            kinds = sorted({k for x in sims for k in x[0]})
            parts = ", ".join(f"{k} {sum(x[0].get(k, 0) for x in sims) / world / 1e6:.1f}"
                              for k in kinds)  # fmt: skip
            calls = ", ".join(f"{k} {v}" for k, v in sorted(sims[0][1].items()))
            rows.append(f"| {world} | {o_sign} | {calls} | {mean / 1e6:.1f} ({peak / 1e6:.1f}): "
                        f"{parts} | {base / 1e6:.1f} | {mean / base:.2f} |")  # fmt: skip
    day = time.strftime("%Y-%m-%d")
    text = "\n".join(
        [
            "# Bytes per optimizer step under FSDP2: a Llama-7B-shaped layer",
            "",
            f"`python bench/comm_bytes.py`, {day}, torch {torch.__version__}: a simulation (fake "
            "process group, every rank in turn), not a measurement on a cluster.",
            f"Layer: d {D}, {H} heads of {DH} (MHA), SwiGLU MLP {FFN}; fp32 optimizer traffic.",
            "",
            *rows,
            "",
            "At 8 ranks the QK pair is local (4 whole heads per rank). OV: one all_reduce of the O",
            "and V Grams (2 x 32 x 128^2 floats) plus the hybrid O sign: `gather` moves o_w's",
            "direction once, `sharded` all-reduces a 4096^2 Gram in each of 8 Newton-Schulz steps",
            "(plus its norm). At 64 ranks 32 heads cannot be split whole: both pairs fall back to",
            "gathering their weights and direction (the O sign choice then does not apply). Muon:",
            "one all_to_all to each MLP matrix's owner and one back (owners rotate, so a whole",
            "model spreads them evenly; one layer of three matrices cannot, hence the max). Two",
            "one-flag all_reduces agree on non-finite gradients and results.",
            "",
        ]
    )
    path = Path("bench/results/comm_bytes.md")
    kept = path.read_text().split("## Llama-70B", 1) if path.exists() else [""]
    path.write_text(text + ("\n## Llama-70B" + kept[1] if len(kept) > 1 else ""))
    print(text)


if __name__ == "__main__":
    import sys

    if "--llama70b" in sys.argv:
        path = Path("bench/results/comm_bytes.md")
        head = path.read_text().split("## Llama-70B")[0].rstrip() + "\n\n"
        section = main_70b()
        path.write_text(head + section)
        print(section)
    else:
        main()
