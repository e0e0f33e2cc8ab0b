"""MLA's RoPE part: a multi-query CM pair or Muon? Measured on a demo-sized DeepSeek-V3.

    python bench/mla_rope.py                       # 3 seeds x 2 variants, writes the table
    python bench/mla_rope.py --steps 50 --seeds 0  # a quick look

The model is transformers' ``DeepseekV3ForCausalLM`` at the demo's scale (bytes, 4 layers,
width 128, 4 heads; q latent 64, kv latent 32, no-RoPE and value heads of 32, RoPE heads of
16; dense MLPs, so the comparison is about attention), trained on the demo's embedded text
with the demo's batches and evaluation. Two layouts (``cm_triton.layouts``):

- ``mla``: the no-RoPE QK pair and the OV pair per head, and the RoPE part as a multi-query
  CM pair (every head's ``q_rope`` rows with the one shared ``k_pe`` block);
- ``mla_rope_muon``: the same two pairs; ``q_rope`` rows and ``kv_a_proj_with_mqa`` on Muon.

Same seed = same initial weights and batches, so the difference is paired by seed.
Writes ``OUT/mla_rope.md`` and ``OUT/mla_rope.json``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import real_models  # noqa: E402, F401 - makes transformers importable beside CPU torch

from cm_triton import CompositionalMuon, demo, discovery, param_groups  # noqa: E402

VARIANTS = ("mla", "mla_rope_muon")
CONFIG = dict(vocab_size=256, hidden_size=128, intermediate_size=512, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=4, q_lora_rank=64, kv_lora_rank=32,
              qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
              max_position_embeddings=128, first_k_dense_replace=4, n_routed_experts=4,
              num_experts_per_tok=2, n_group=1, topk_group=1, moe_intermediate_size=64,
              tie_word_embeddings=False)  # fmt: skip


class ByteLM(nn.Module):
    """The demo's interface (``model(x, y) -> loss``, ``model.cfg.block_size``)."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

        self.lm = DeepseekV3ForCausalLM(DeepseekV3Config(**CONFIG))
        self.cfg = demo.GPTConfig()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=x).logits
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def train(variant: str, seed: int, args, train_data, val_data) -> dict:
    torch.manual_seed(seed)
    model = ByteLM()
    discovery.MLA_LAYOUT, kept = variant, discovery.MLA_LAYOUT
    try:
        groups = param_groups(model, unrecognised="raise")
    finally:
        discovery.MLA_LAYOUT = kept
    assert {g.get("layout") for g in groups if g["kind"] == "attention"} == {variant}
    opt = CompositionalMuon(groups, lr=args.lr, adamw_lr=demo.ADAMW_LR)
    gen = torch.Generator().manual_seed(seed)
    curve, start = [], time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y = demo.batch(train_data, args.batch_size, model.cfg.block_size, gen, "cpu")
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % args.eval_every == 0 or step == args.steps:
            curve.append((step, demo.evaluate(model, val_data, args, "cpu")))
    return {"variant": variant, "seed": seed, "final_val_loss": curve[-1][1], "curve": curve,
            "seconds": time.perf_counter() - start}  # fmt: skip


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--lr", type=float, default=demo.LR["cm"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--out", default="bench/results")
    args = p.parse_args(argv)
    train_data, val_data = demo.load_bytes(None, demo.GPTConfig.block_size)
    runs = []
    for seed in args.seeds:
        for v in VARIANTS:
            runs.append(train(v, seed, args, train_data, val_data))
            r = runs[-1]
            print(f"{v:<15} seed {seed}: val {r['final_val_loss']:.4f} ({r['seconds']:.0f} s)")
    by = {(r["variant"], r["seed"]): r["final_val_loss"] for r in runs}
    diffs = [by[("mla", s)] - by[("mla_rope_muon", s)] for s in args.seeds]
    mean = statistics.mean(diffs)
    spread = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    cmd = "python bench/mla_rope.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# MLA's RoPE part: multi-query CM pair (`mla`) or Muon (`mla_rope_muon`)",
        "",
        f"Command: `{cmd.strip()}`; {datetime.now(timezone.utc):%Y-%m-%d}, torch "
        f"{torch.__version__}, {platform.machine()} CPU ({torch.get_num_threads()} threads).",
        f"Model: transformers DeepseekV3ForCausalLM, {CONFIG}; the demo's data (embedded "
        f"pydoc_data.topics, bytes), {args.steps} steps of batch {args.batch_size} x 128, "
        f"lr {args.lr} (CM and Muon groups), AdamW {demo.ADAMW_LR} on the rest.",
        "",
        "| seed | mla | mla_rope_muon | mla − mla_rope_muon |",
        "|---|---|---|---|",
    ]
    for s, d in zip(args.seeds, diffs):
        lines.append(f"| {s} | {by[('mla', s)]:.4f} | {by[('mla_rope_muon', s)]:.4f} | "
                     f"{d:+.4f} |")  # fmt: skip
    lines += ["", f"Paired difference: {mean:+.4f} ± {spread:.4f} nats/byte (mean ± standard "
              f"error over {len(diffs)} seeds; negative: the CM RoPE pair is better)."]  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mla_rope.md").write_text("\n".join(lines) + "\n")
    (out / "mla_rope.json").write_text(json.dumps({"args": vars(args), "runs": runs}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
