"""Check this installation: ``python -m cm_triton.check [--out REPORT.md]``.

What ``python -m bitsandbytes`` or ``python -m xformers.info`` do for their users:

1. versions and the device;
2. every kernel configuration a default ``CompositionalMuon`` step launches (a Llama-shaped
   GQA model: CM on attention, Muon on the MLP; fp32 and bf16 weights), each compiled, run
   and compared with the pure-torch reference on the same inputs (``dispatch.Guard``): pass
   or fail, with the error and the difference against its tolerance;
3. kernel against reference time per phase;
4. one whole step against ``torch.optim.Muon`` (+ AdamW on the rest) on the same model.

The exit status is non-zero if any kernel failed or differed, or a section raised. On a
CUDA GPU it checks the compiled kernels at a real width (d 1024, heads of 128); on the CPU
it runs them through Triton's interpreter (``TRITON_INTERPRET=1``, set here before Triton is
imported) on tiny shapes, so the same command is testable anywhere. Each section is printed
(and appended to ``--out``) as it finishes.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ:
    import torch as _torch  # only to ask whether a GPU is here, before Triton is imported

    if not _torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
from torch import nn  # noqa: E402

from cm_triton import CompositionalMuon, dispatch, param_groups  # noqa: E402

__all__ = ["main", "LlamaShaped"]


class _Attention(nn.Module):
    def __init__(self, d: int, hq: int, hkv: int) -> None:
        super().__init__()
        dh = d // hq
        self.num_heads, self.num_key_value_heads, self.head_dim = hq, hkv, dh
        self.q_proj = nn.Linear(d, hq * dh, bias=False)
        self.k_proj = nn.Linear(d, hkv * dh, bias=False)
        self.v_proj = nn.Linear(d, hkv * dh, bias=False)
        self.o_proj = nn.Linear(hq * dh, d, bias=False)


class _Block(nn.Module):
    def __init__(self, d: int, hq: int, hkv: int, hidden: int) -> None:
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(d), nn.RMSNorm(d)
        self.self_attn = _Attention(d, hq, hkv)
        self.mlp = nn.ModuleDict({n: nn.Linear(*io, bias=False) for n, io in
                                  (("gate_proj", (d, hidden)), ("up_proj", (d, hidden)),
                                   ("down_proj", (hidden, d)))})  # fmt: skip


class LlamaShaped(nn.Module):
    """A Llama-shaped model's parameters (no forward: a step needs only gradients)."""

    def __init__(self, n: int, d: int, hq: int, hkv: int, hidden: int, vocab: int = 256) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, d)
        self.layers = nn.ModuleList(_Block(d, hq, hkv, hidden) for _ in range(n))
        self.norm = nn.RMSNorm(d)
        self.lm_head = nn.Linear(d, vocab, bias=False)


def _sizes(device: torch.device) -> dict:
    if device.type == "cuda":  # heads of 128, a SwiGLU MLP of 2816 (the MLP legs row-tiled)
        return {"n": 2, "d": 1024, "hq": 8, "hkv": 2, "hidden": 2816}
    return {"n": 1, "d": 32, "hq": 2, "hkv": 1, "hidden": 96}  # interpreter: tiny, GQA


def _grads(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        g = torch.randn(p.shape, generator=gen) * 1e-2
        p.grad = g.to(device=p.device, dtype=p.dtype)


def section_versions(device: torch.device) -> list[str]:
    import triton

    rows = [
        f"- Python {platform.python_version()}, torch {torch.__version__}, triton "
        f"{triton.__version__}, CUDA {torch.version.cuda}, ROCm {torch.version.hip}",
        f"- TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '0')}",
    ]
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        rows.append(f"- device: {torch.cuda.get_device_name(device)}, sm_{cap[0]}{cap[1]}")
    else:
        rows.append("- device: CPU (no CUDA GPU here): the kernels run in Triton's interpreter")
    return rows


def section_kernels(device: torch.device) -> tuple[list[str], bool]:
    """A default step's every kernel configuration against the reference."""
    dispatch.Guard.reset()
    backend = "auto" if device.type == "cuda" else "triton"
    rows = ["| phase | dtype | operand shapes | status | difference / tolerance |",
            "|---|---|---|---|---|"]  # fmt: skip
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = LlamaShaped(**_sizes(device)).to(device, dtype)
        with dispatch.checked():
            opt = CompositionalMuon(param_groups(model), lr=0.02, backend=backend)
            # On a GPU a second, steady step (the kernels' configurations are the first's)
            for seed in (0, 1) if device.type == "cuda" else (0,):
                _grads(model, seed)
                opt.step()
    for v in dispatch.Guard.verdicts:
        shapes = " ".join("x".join(map(str, s)) for s in v["shapes"][:3])
        diff = (f"{v['error']:.2e} / {v['tolerance']:.2e}" if "error" in v
                else v.get("detail", ""))  # fmt: skip
        if v.get("status") != "ok" and "error" in v:
            diff += f" ({v.get('detail', '')})"
        rows.append(f"| {v['phase']} | {v['dtype']} | {shapes} | {v.get('status')} | {diff} |")
    bad = [v for v in dispatch.Guard.verdicts if v.get("status") != "ok"]
    n = len(dispatch.Guard.verdicts)
    rows += ["", f"**{n - len(bad)} of {n} kernel configurations match the reference.**"]
    if not n:
        rows.append("**No kernel ran**: the step took the reference everywhere.")
    return rows, bool(bad) or not n


def _timed(fn, device: torch.device, reps: int) -> float:
    """Median milliseconds of ``fn()`` after a warm-up call (CUDA events on a GPU)."""
    fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, stop = (torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(stop))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def section_phases(device: torch.device, reps: int) -> list[str]:
    from cm_triton.kernels import phases as kp
    from cm_triton.reference import phases as ref
    from cm_triton.schedules import POLAR_EXPRESS_8

    b, h, dh, n = (4, 32, 128, 4096) if device.type == "cuda" else (1, 2, 16, 64)
    gen = torch.Generator().manual_seed(0)
    w, g, m = (torch.randn(b, h, dh, n, generator=gen).to(device) for _ in range(3))
    s = torch.randn(b, h, dh, dh, generator=gen).to(device)
    a = s @ s.mT / dh + torch.eye(dh, device=device)
    cases = {
        "stream": lambda ops: ops.stream(w, g, m, 0.95, False),
        "restart_gram": lambda ops: ops.restart_gram(a, g, m, 0.95, False),
        "apply_update": lambda ops: ops.apply_update(w, a, g, m, 0.95, False, 1.0, 0.01),
        "first_maps": lambda ops: ops.first_maps(a, a, POLAR_EXPRESS_8[:3]),
        "inv_sqrt": lambda ops: ops.inv_sqrt(a, "quintic"),
    }
    note = "" if device.type == "cuda" else " (CPU: the interpreter, not a kernel's speed)"
    rows = [
        f"(B, H, dh, n) = {(b, h, dh, n)}; median ms of {reps}{note}",
        "",
        "| phase | kernel ms | reference ms | kernel / reference |",
        "|---|---|---|---|",
    ]
    for name, run in cases.items():
        k = _timed(lambda run=run: run(kp), device, reps)
        r = _timed(lambda run=run: run(ref), device, reps)
        rows.append(f"| {name} | {k:.3f} | {r:.3f} | {k / r:.2f} |")
    return rows


def section_step(device: torch.device, reps: int) -> list[str]:
    rows = ["| weights | CompositionalMuon ms | torch.optim.Muon + AdamW ms | ratio |",
            "|---|---|---|---|"]  # fmt: skip
    muon_cls = getattr(torch.optim, "Muon", None)
    if muon_cls is None:
        return [f"(torch {torch.__version__} has no torch.optim.Muon)"]
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = LlamaShaped(**_sizes(device)).to(device, dtype)
        _grads(model, 0)
        opt = CompositionalMuon(param_groups(model), lr=0.02)
        hidden = [p for name, p in model.named_parameters() if p.ndim == 2
                  and "embed" not in name and "lm_head" not in name]  # fmt: skip
        rest = [p for p in model.parameters() if all(p is not q for q in hidden)]
        tm, ta = muon_cls(hidden, lr=0.02), torch.optim.AdamW(rest, lr=1e-3, foreach=True)
        c = _timed(opt.step, device, reps)
        m = _timed(lambda tm=tm, ta=ta: (tm.step(), ta.step()), device, reps)
        rows.append(f"| {dtype} | {c:.2f} | {m:.2f} | {c / m:.2f} |")
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cm_triton.check", description=__doc__.split(
        "\n")[0])  # fmt: skip
    ap.add_argument("--out", default=None, help="append the markdown report to this file")
    ap.add_argument("--reps", type=int, default=None, help="timed repetitions per case")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if not dispatch.triton_available():
        print("triton is not installed: every phase runs on the pure-torch reference")
        return 1
    if device.type != "cuda" and not dispatch.interpreting():
        print("no CUDA device and TRITON_INTERPRET is not 1: run as `python -m "
              "cm_triton.check` (it sets the interpreter itself) or on a GPU")  # fmt: skip
        return 1
    reps = args.reps or (20 if device.type == "cuda" else 1)
    out = Path(args.out) if args.out else None
    failed = False
    sections = [
        ("Versions", lambda: (section_versions(device), False)),
        ("A default step's kernels against the reference", lambda: section_kernels(device)),
        ("Kernel against reference, per phase", lambda: (section_phases(device, reps), False)),
        ("One step against torch.optim.Muon", lambda: (section_step(device, reps), False)),
    ]
    for title, run in sections:
        t = time.perf_counter()
        try:
            rows, bad = run()
        except Exception:  # noqa: BLE001 - a failed section is reported, the rest still runs
            rows, bad = ["```", traceback.format_exc().strip(), "```"], True
        failed = failed or bad
        text = "\n".join([f"## {title}", "", *rows, "", f"({time.perf_counter() - t:.0f} s)",
                          ""])  # fmt: skip
        print(text, flush=True)
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            with out.open("a") as f:
                f.write(text + "\n")
    print("FAIL" if failed else "OK: every check passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
