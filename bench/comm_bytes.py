"""Bytes a rank sends per optimizer step under FSDP2, for a Llama-7B-shaped layer at world
sizes 8 and 64: a simulation of a scale this CPU cannot run, from the optimizer's own counting.

    python bench/comm_bytes.py            # writes bench/results/comm_bytes.md

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

import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

import cm_triton.engine as engine
from cm_triton import CompositionalMuon, param_groups
from cm_triton.reference.rule import REFERENCE, Primitives

D, H, DH, FFN = 4096, 32, 128, 11008


class Layer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads, self.head_dim = H, H, DH
        self.q_proj, self.k_proj = (
            nn.Linear(D, H * DH, bias=False),
            nn.Linear(D, H * DH, bias=False),
        )
        self.v_proj, self.o_proj = (
            nn.Linear(D, H * DH, bias=False),
            nn.Linear(H * DH, D, bias=False),
        )
        self.gate_proj = nn.Linear(D, FFN, bias=False)
        self.up_proj = nn.Linear(D, FFN, bias=False)
        self.down_proj = nn.Linear(FFN, D, bias=False)
        self.norm = nn.RMSNorm(D)


def _zero_sign(x, coefficients=None, dtype=None, method="ns", restart=0):
    return torch.zeros_like(x, dtype=torch.float32)


def simulate(world: int, rank: int, o_sign: str) -> tuple[dict, dict, float]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    try:
        mesh = init_device_mesh("cpu", (world,))
        with torch.device("meta"):
            layer = Layer()
        fully_shard(layer, mesh=mesh)
        layer.to_empty(device="cpu")
        with torch.no_grad():
            for p in layer.parameters():
                p.to_local().normal_()
        for p in layer.parameters():
            loc = torch.randn_like(p.to_local())
            p.grad = DTensor.from_local(loc, mesh, p.placements, run_check=False,
                                        shape=p.shape, stride=p.stride())  # fmt: skip
        opt = CompositionalMuon(param_groups(layer), lr=1e-3, o_sign=o_sign)
        opt.step()
        baseline = sum((world - 1) * p.to_local().numel() * 4 for p in layer.parameters()
                       if p.ndim == 2)  # fmt: skip
        return dict(opt.comm.sent), dict(opt.comm.counts), baseline
    finally:
        dist.destroy_process_group()


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


def main() -> None:
    fast = Primitives(msign=_zero_sign, phases=REFERENCE.phases)
    engine.resolve_primitives = lambda backend, device: fast
    dist.all_to_all_single = _zero_filled(dist.all_to_all_single, empty_input_ok=True)
    dist.all_gather_single = _zero_filled(dist.all_gather_single)
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
    Path("bench/results/comm_bytes.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
