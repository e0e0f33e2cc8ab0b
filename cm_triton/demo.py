"""Train a small GPT with Compositional Muon on attention, Muon/AdamW on the rest.

    python -m cm_triton.demo                      # CM, embedded text, CPU, ~2 minutes
    python -m cm_triton.demo --compare            # cm and muon, same seed and data, table + PNG
    python -m cm_triton.demo --compare cm cm-isotropic muon adamw --steps 300

Default data: the documentation text that ships inside CPython (``pydoc_data.topics``, about
0.47 MB of English technical prose), byte-level, last 10% held out for validation.
``--corpus c-headers`` takes the C API headers every CPython install has instead (about 0.89 MB
of C); ``--data PATH`` takes any UTF-8 text file. Nothing is downloaded.
``--size 4x`` trains a model about 4x the default's 0.81M parameters (width 256, 8/4 heads).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from cm_triton.discovery import param_groups
from cm_triton.optim import CompositionalMuon
from cm_triton.schedules import POLAR_EXPRESS_8

OPTIMIZERS = ("cm", "cm-isotropic", "cm-release", "cm-per-query", "cm-damp1e-3", "cm-damp1e-1",
              "cm-pre", "cm-post", "cm-frob", "muon-per-head", "cm-muon8", "muon",
              "adamw")  # fmt: skip
# Matrix lr per optimizer (AdamW's lr for "adamw"): the best of bench/quality.py's 1000-step
# sweep on the default data, factor-2 grids, seed 99 (bench/results/quality.md). The CM
# variants below "cm-per-query" and "muon-per-head" were not swept there: they take cm's rate.
LR = {"cm": 0.01, "cm-isotropic": 0.01, "cm-release": 0.01, "cm-per-query": 0.01, "muon": 0.005,
      "adamw": 1.5e-3}  # fmt: skip
LR.update({n: LR["cm"] for n in OPTIMIZERS if n not in LR})
# The same under the demo's default schedule, warmup-stable-decay (5% warmup, 20% cooldown):
# bench/quality.py's sweep under it on the default data, seed 99, both optima interior
# (bench/results/quality_wsd_topics_demo/quality.md); AdamW and cosine were not swept under
# a schedule: they keep the constant-rate values.
LR_WSD = dict(LR, cm=0.02, muon=0.01)
LR_WSD.update({n: LR_WSD["cm"] for n in OPTIMIZERS if n not in ("muon", "adamw")})
# "cm-release": CM evaluated as the release does (Newton-Schulz iterations on each head, the
# 25-step Newton inverse root), for comparing this package's Gram-form default against it.
RELEASE_EVALUATION = {"ns_method": "ns", "inv_root": "newton"}
# Options of the CM attention groups, per optimizer name (param_groups' keyword arguments):
# "cm-per-query": the shared K/V factors' budget b / G (gqa_budget="per_query", as
# microsoft/dion's port; spec §1), against the default "group". "cm-damp1e-3"/"cm-damp1e-1":
# the damping λ of the inverse roots (default 1e-2). "cm-pre"/"cm-post": only the inner or
# only the outer whitening. "cm-frob": connection="frobenius_scalar". "muon-per-head":
# whitening="none", each head orthogonalised on its own (per-head Muon; spec §4).
OPTIONS = {
    "cm-release": RELEASE_EVALUATION,
    "cm-per-query": {"gqa_budget": "per_query"},
    "cm-damp1e-3": {"damping": 1e-3},
    "cm-damp1e-1": {"damping": 1e-1},
    "cm-pre": {"whitening": "pre"},
    "cm-post": {"whitening": "post"},
    "cm-frob": {"connection": "frobenius_scalar"},
    "muon-per-head": {"whitening": "none"},
}
# Options of the Muon groups: "cm-muon8": the 8-step Polar Express schedule the Muon groups ran
# before 0.4.0 (now 5 steps, schedules.MUON_COEFFICIENTS), for the measurement that chose it.
MUON_OPTIONS = {"cm-muon8": {"ns_coefficients": POLAR_EXPRESS_8}}
ADAMW_LR = 3e-3  # embeddings, head, norms: the same AdamW for every optimizer


# -- model --------------------------------------------------------------------------------
@dataclass
class GPTConfig:
    vocab_size: int = 256  # bytes
    block_size: int = 128
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 2  # grouped-query attention, G = 2
    d_model: int = 128


# Model sizes: "demo" is GPTConfig()'s defaults (0.81M parameters); "4x" doubles the width
# and the head counts (head size 32 and G = 2 kept, same depth): 3.05M parameters, 3.8x.
SIZES = {"demo": GPTConfig(), "4x": GPTConfig(d_model=256, n_head=8, n_kv_head=4)}


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.num_heads, self.num_key_value_heads = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.d_model // cfg.n_head
        d, dh = cfg.d_model, self.head_dim
        self.q_proj = nn.Linear(d, cfg.n_head * dh, bias=False)
        self.k_proj = nn.Linear(d, cfg.n_kv_head * dh, bias=False)
        self.v_proj = nn.Linear(d, cfg.n_kv_head * dh, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * dh, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, self.num_key_value_heads, self.head_dim).transpose(1, 2)
        g = self.num_heads // self.num_key_value_heads
        k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = Attention(cfg)
        self.fc = nn.Linear(cfg.d_model, 4 * cfg.d_model, bias=False)
        self.proj = nn.Linear(4 * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.proj(F.gelu(self.fc(self.ln2(x))))


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.block_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.shape[1]
        x = self.tok_emb(idx) + self.pos_emb(torch.arange(t, device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


# -- data ---------------------------------------------------------------------------------
def embedded_text() -> str:
    """CPython's own documentation topics (``pydoc_data.topics``), joined in a fixed order."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def c_headers_text() -> str:
    """The C API headers of this Python (``sysconfig``'s include dir, ``*.h`` under it, about
    0.89 MB for CPython 3.11): C declarations and macros, a different kind of text from the
    docs topics. Files joined in the order of their relative paths, each under a
    ``/* path */`` line."""
    import sysconfig

    root = Path(sysconfig.get_paths()["include"])
    files = sorted(root.rglob("*.h"), key=lambda f: f.relative_to(root).as_posix())
    if not files:
        raise SystemExit(f"error: corpus c-headers: no *.h files under {root}")
    return "\n\n".join(
        f"/* {f.relative_to(root).as_posix()} */\n" + f.read_text(encoding="utf-8") for f in files
    )


CORPORA = {"topics": embedded_text, "c-headers": c_headers_text}


def load_bytes(
    path: str | None, block_size: int, corpus: str = "topics"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train/validation byte tensors (last 10% held out) of the file ``path``, or of the
    built-in ``corpus`` (a key of ``CORPORA``) without one."""
    if path is None:
        text = CORPORA[corpus]()
    else:
        p = Path(path)
        if not p.is_file():
            raise SystemExit(f"error: --data {path}: no such file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: --data {path}: not UTF-8 text ({e.reason})") from None
    data = torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8).long()
    n_val = len(data) // 10
    if n_val < block_size + 2:
        need = 10 * (block_size + 2)
        raise SystemExit(
            f"error: --data {path}: {len(data)} bytes is too short (need {need} for one "
            f"validation block of {block_size})"
        )
    return data[:-n_val], data[-n_val:]


def batch(data: torch.Tensor, size: int, block: int, gen: torch.Generator, device: str):
    ix = torch.randint(len(data) - block - 1, (size,), generator=gen)
    x = torch.stack([data[i : i + block] for i in ix])
    y = torch.stack([data[i + 1 : i + 1 + block] for i in ix])
    return x.to(device), y.to(device)


# -- training -----------------------------------------------------------------------------
SCHEDULES = ("constant", "cosine", "wsd")


def lr_factor(schedule: str, steps: int, warmup: float, cooldown: float):
    """The multiplier of every group's lr after ``k`` optimizer steps (``LambdaLR``'s
    ``lr_lambda``): ``"constant"``: 1; ``"cosine"``: linear warmup over the first ``warmup``
    fraction of ``steps``, then a cosine to 0 at the last step; ``"wsd"`` (warmup-stable-decay):
    the warmup, 1, then a linear cooldown to 0 over the last ``cooldown`` fraction."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (0 <= warmup < 1 and 0 < cooldown <= 1):
        raise ValueError(f"warmup must be in [0, 1) and cooldown in (0, 1], got {warmup}, "
                         f"{cooldown}")  # fmt: skip
    w, c = round(warmup * steps), max(1, round(cooldown * steps))

    def factor(k: int) -> float:  # k = steps taken; the step about to run is k + 1
        if schedule == "constant":
            return 1.0
        if k < w:
            return (k + 1) / (w + 1)
        if schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (k - w) / max(1, steps - w))))
        return min(1.0, (steps - k) / c)

    return factor


def default_lr(name: str, schedule: str = "constant") -> float:
    """``name``'s matrix lr as swept under ``schedule`` (``LR_WSD`` for ``"wsd"``, else
    ``LR``)."""
    return (LR_WSD if schedule == "wsd" else LR)[name]


def make_optimizer(name: str, model: nn.Module, lr: float | None = None,
                   weight_decay: float = 0.0, schedule: str = "constant"):  # fmt: skip
    """``name``'s optimizer on ``model`` at matrix lr ``lr`` (default: ``default_lr(name,
    schedule)``); ``weight_decay``: decoupled, on every group (CM and Muon ``W <- (1 - lr wd)
    W``, AdamW's own)."""
    lr = default_lr(name, schedule) if lr is None else lr
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95),
                                 weight_decay=weight_decay)  # fmt: skip
    options = OPTIONS.get(name, {})
    groups = param_groups(model, attention=name != "muon", isotropic=name == "cm-isotropic",
                          **options)  # fmt: skip
    for g in groups:
        if g["kind"] == "muon":
            g.update(MUON_OPTIONS.get(name, {}))
    return CompositionalMuon(groups, lr=lr, adamw_lr=ADAMW_LR, weight_decay=weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, val: torch.Tensor, args, device: str) -> float:
    model.eval()
    gen = torch.Generator().manual_seed(1234)  # the same validation batches every time
    losses = [model(*batch(val, args.batch_size, model.cfg.block_size, gen, device)).item()
              for _ in range(args.eval_batches)]  # fmt: skip
    model.train()
    return sum(losses) / len(losses)


def train(name: str, args, train_data, val_data) -> dict:
    torch.manual_seed(args.seed)
    device = args.device
    model = GPT(SIZES[getattr(args, "size", "demo")]).to(device)
    schedule = getattr(args, "schedule", "constant")
    opt = make_optimizer(name, model, args.lr, getattr(args, "weight_decay", 0.0), schedule)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lr_factor(schedule, args.steps, getattr(args, "warmup", 0.0),
                       getattr(args, "cooldown", 0.2)))  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    curve: list[tuple[int, float]] = []
    # (step, training seconds so far, val loss): the time excludes the evaluations, which
    # cost every optimizer the same.
    timed: list[tuple[int, float, float]] = []
    first = 1
    if args.resume:
        ck = torch.load(args.resume)
        if ck["optimizer_name"] != name:
            raise SystemExit(f"error: --resume {args.resume}: saved by {ck['optimizer_name']!r}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if "scheduler" in ck:
            sched.load_state_dict(ck["scheduler"])
        gen.set_state(ck["generator"])
        first, curve = ck["step"] + 1, [tuple(c) for c in ck["curve"]]
        timed = [tuple(c) for c in ck.get("timed_curve", [])]
    start = time.perf_counter()
    train_seconds = timed[-1][1] if timed else 0.0
    tick = time.perf_counter()
    # The bar is off without a TTY (disable=None); bar.write prints the eval lines either way.
    bar = tqdm(range(first, args.steps + 1), desc=name, leave=False, file=sys.stderr, disable=None)
    loss = float("nan")
    for step in bar:
        x, y = batch(train_data, args.batch_size, model.cfg.block_size, gen, device)
        loss_t = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss_t.backward()
        opt.step()
        sched.step()
        loss = loss_t.item()
        if not math.isfinite(loss):
            raise SystemExit(f"error: {name}: training loss became {loss} at step {step}")
        if step % args.eval_every == 0 or step == args.steps:
            train_seconds += time.perf_counter() - tick
            val = evaluate(model, val_data, args, device)
            tick = time.perf_counter()
            curve.append((step, val))
            timed.append((step, train_seconds, val))
            bar.write(f"{name} step {step}: train {loss:.4f}  val {val:.4f}")
        bar.set_postfix(loss=f"{loss:.3f}")
    elapsed = time.perf_counter() - start
    if args.checkpoint:
        torch.save({"optimizer_name": name, "model": model.state_dict(), "step": args.steps,
                    "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "generator": gen.get_state(), "curve": curve,
                    "timed_curve": timed}, args.checkpoint)  # fmt: skip
    tokens = (args.steps - first + 1) * args.batch_size * model.cfg.block_size
    return {"optimizer": name, "final_train_loss": loss, "final_val_loss": curve[-1][1],
            "curve": curve, "timed_curve": timed, "seconds": elapsed,
            "train_seconds": train_seconds, "tokens_per_s": tokens / elapsed}  # fmt: skip


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in results:
        steps, vals = zip(*r["curve"])
        ax.plot(steps, vals, marker="o", ms=3, label=r["optimizer"])
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("cm_triton demo: small GPT on pydoc_data.topics")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="cm_triton.demo", description=__doc__.split("\n")[0])
    p.add_argument("--optimizer", default="cm", choices=OPTIMIZERS)
    p.add_argument(
        "--compare",
        nargs="*",
        choices=OPTIMIZERS,
        default=None,
        help="run several optimizers with the same seed and data (default: cm muon)",
    )
    p.add_argument("--steps", type=int, default=1000)  # ~2 minutes on 2 CPU cores
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=None, help="matrix lr (default: per optimizer)")
    p.add_argument(
        "--schedule",
        default="wsd",
        choices=SCHEDULES,
        help="lr schedule: constant, warmup + cosine, or warmup-stable-decay (the default: "
        "lower loss than constant at every lr swept, bench/results/quality_protocol.md)",
    )
    p.add_argument("--warmup", type=float, default=0.05, help="warmup, a fraction of --steps")
    p.add_argument(
        "--cooldown",
        type=float,
        default=0.2,
        help="wsd: the linear cooldown, a fraction of --steps",
    )
    p.add_argument(
        "--weight-decay", type=float, default=0.0, help="decoupled weight decay on every group"
    )
    p.add_argument("--data", default=None, help="UTF-8 text file (default: --corpus)")
    p.add_argument("--corpus", default="topics", choices=CORPORA, help="built-in text")
    p.add_argument("--size", default="demo", choices=SIZES, help="model size preset")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="out", help="directory for the log and the plot")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--checkpoint", default=None, help="save model+optimizer state here at the end")
    p.add_argument("--resume", default=None, help="continue from a --checkpoint file to --steps")
    args = p.parse_args(argv)
    if (args.checkpoint or args.resume) and args.compare is not None:
        p.error("--checkpoint/--resume work with a single --optimizer, not --compare")
    if args.resume and not Path(args.resume).is_file():
        p.error(f"--resume {args.resume}: no such file")
    for name in ("steps", "eval_every", "eval_batches", "batch_size"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if not 0 <= args.warmup < 1:
        p.error(f"--warmup must be a fraction in [0, 1), got {args.warmup}")
    if not 0 < args.cooldown <= 1:
        p.error(f"--cooldown must be a fraction in (0, 1], got {args.cooldown}")
    if not 0 <= args.weight_decay < 1:
        p.error(f"--weight-decay must be in [0, 1), got {args.weight_decay}")
    return args


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train_data, val_data = load_bytes(args.data, SIZES[args.size].block_size, args.corpus)
    names = [args.optimizer] if args.compare is None else (args.compare or ["cm", "muon"])
    results = [train(n, args, train_data, val_data) for n in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"args": vars(args), "model": asdict(SIZES[args.size]), "torch": torch.__version__}
    (out / "demo_results.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    print(f"\n{'optimizer':<14} {'final val loss':>14} {'final train':>12} {'tokens/s':>10}")
    for r in results:
        print(f"{r['optimizer']:<14} {r['final_val_loss']:>14.4f} {r['final_train_loss']:>12.4f} "
              f"{r['tokens_per_s']:>10.0f}")  # fmt: skip
    if len(results) > 1:
        plot(results, out / "val_loss.png")
        print(f"plot: {out / 'val_loss.png'}")
    print(f"log: {out / 'demo_results.json'}")
    return results


if __name__ == "__main__":
    main()
