"""The prepared GPU check's benchmarks: one run on a machine with a CUDA GPU.

    bash bench/gpu_check.sh --out "$OUT/gpu_check.md"   # on the GPU machine (<= 5 minutes)
    python bench/gpu_check.py --dry-run --out r.md       # anywhere: tiny shapes, the CPU

``bench/gpu_check.sh`` first runs ``python3 -m cm_triton.check`` (every kernel configuration
of a default step against the reference, per-phase times, a step against torch.optim.Muon),
then this. Plain Python (no pytest on the GPU machine). Each section is timed with CUDA events
(median of ``--reps`` after warm-up), guarded so one failure is reported and the rest still
runs, and appended to ``--out`` as soon as it finishes (a timeout keeps what was done):

1. compiled kernels against the reference on a subset of flags (``cm_qk``/``cm_ov`` with
   ``backend="triton"`` against ``"reference"``), every Newton-Schulz sign iterated in fp32 on
   both sides (``ns_dtype=torch.float32``: the CUDA default bf16 alone differs by ~1e-2 between
   two runs of the reference), relative step difference against the fp32 bound 1e-4;
2. kernel against torch per phase at (B, H, dh, n) = (4, 32, 128, 4096);
3. the whole step against ``torch.optim.Muon``: one layer (32, 128, 4096), and a Llama-shaped
   GQA model (4 blocks, d 1024), fp32 and bf16;
4. CUDA-graph capture of ``CompositionalMuon(capturable=True, nonfinite="skip")``: captured
   and replayed steps against eager steps;
5. host time per step on tiny tensors against ``torch.optim.AdamW(foreach=True)`` and
   ``torch.optim.Muon``.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

if "--dry-run" in sys.argv:  # the kernels through the interpreter: set before triton imports
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from step_costs import Llama, hidden_matrices  # noqa: E402

from cm_triton import CompositionalMuon, cm_ov, cm_qk, param_groups  # noqa: E402


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> float:
    """Median milliseconds of ``fn()`` after two warm-up calls."""
    for _ in range(2):
        fn()
    _sync(device)
    times = []
    for _ in range(reps):
        if device == "cuda":
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            stop.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(stop))
        else:
            t = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t))
    return statistics.median(times)


def _layer(h, dh, d, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = [(h * dh, d)] * 3 + [(d, h * dh)]
    ws = [(torch.randn(s, generator=g) / d**0.5).to(device, dtype) for s in shapes]
    gs = [torch.randn(s, generator=g).to(device, dtype) for s in shapes]
    ms = [torch.zeros(s, device=device, dtype=dtype) for s in shapes]
    return ws, gs, ms


FLAGS = [
    {},
    {"hybrid": False},
    {"nesterov": True, "per_mat_renorm": True},
    {"isotropic": True},
    {"whitening": "pre"},
    {"method": "joint"},
    {"connection": "frobenius"},
    {"momentum_reproject": True, "connection": "scale_aware_scalar"},
]


def parity(shape, device, flag_sets=FLAGS) -> list[str]:
    rows = ["fp32 Newton-Schulz iterations on both sides (ns_dtype=torch.float32)", "",
            "| flags | qk rel. diff | ov rel. diff |", "|---|---|---|"]  # fmt: skip
    h, dh, d = shape
    for flags in flag_sets:
        diffs = []
        for fn, idx in ((cm_qk, (0, 1)), (cm_ov, (2, 3))):
            out = {}
            for backend in ("reference", "triton"):
                ws, gs, ms = _layer(h, dh, d, device, torch.float32)
                a, b = idx
                kw = {k: v for k, v in flags.items() if fn is cm_ov or k != "hybrid"}
                fn(ws[a], ws[b], gs[a], gs[b], ms[a], ms[b], head_dim=dh, eta=0.1,
                   backend=backend, ns_dtype=torch.float32, **kw)  # fmt: skip
                out[backend] = (ws[a].clone(), ws[b].clone())
            w0 = _layer(h, dh, d, device, torch.float32)[0]
            rel = max(((t - r).norm() / (r - w0[i]).norm()).item() for t, r, i in
                      zip(out["triton"], out["reference"], idx))  # fmt: skip
            diffs.append(rel)
        mark = "" if max(diffs) <= 1e-4 else " **over 1e-4**"
        rows.append(f"| `{flags or 'defaults'}` | {diffs[0]:.2e} | {diffs[1]:.2e}{mark} |")
    return rows


def phases(shape, device, reps) -> list[str]:
    from cm_triton.kernels import phases as kp
    from cm_triton.reference import phases as ref

    b, h, dh, n = shape
    w, g, m = (torch.randn(b, h, dh, n, device=device) for _ in range(3))
    s = torch.randn(b, h, dh, dh, device=device)
    t = s @ s.mT / dh + torch.eye(dh, device=device)
    rows = ["| phase | kernel ms | torch ms | kernel / torch |", "|---|---|---|---|"]
    cases = {
        "stream": lambda ops: ops.stream(w, g, m, 0.95, False),
        "restart": lambda ops: ops.restart_gram(t, g, m, 0.95, False),
        "apply": lambda ops: ops.apply_update(w, t, g, m, 0.95, False, 1.0, 0.01),
    }
    for name, run in cases.items():
        k = timed(lambda run=run: run(kp), device, reps)
        r = timed(lambda run=run: run(ref), device, reps)
        rows.append(f"| {name} | {k:.3f} | {r:.3f} | {k / r:.2f} |")
    return rows


def steps(layer, model_cfg, device, reps) -> list[str]:
    rows = ["| case | dtype | CompositionalMuon ms | torch.optim.Muon ms | ratio |",
            "|---|---|---|---|---|"]  # fmt: skip
    h, dh, d = layer
    for dtype in (torch.float32, torch.bfloat16):
        ws, gs, ms = _layer(h, dh, d, device, dtype)

        def cm(ws=ws, gs=gs, ms=ms):
            cm_qk(ws[0], ws[1], gs[0], gs[1], ms[0], ms[1], head_dim=dh, eta=1e-3)
            cm_ov(ws[2], ws[3], gs[2], gs[3], ms[2], ms[3], head_dim=dh, eta=1e-3)

        params = [torch.nn.Parameter(w.clone()) for w in ws]
        for p, g in zip(params, gs):
            p.grad = g
        muon = torch.optim.Muon(params, lr=1e-3)
        c, m = timed(cm, device, reps), timed(muon.step, device, reps)
        rows.append(f"| layer (H, dh, d) = {layer} | {dtype} | {c:.2f} | {m:.2f} | {c / m:.2f} |")
        torch.manual_seed(0)
        model = Llama(**model_cfg).to(device, dtype)
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opt = CompositionalMuon(param_groups(model), lr=0.02)
        hidden = hidden_matrices(model)
        rest = [p for p in model.parameters() if all(p is not q for q in hidden)]
        tm, ta = torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=1e-3, foreach=True)

        def baseline(tm=tm, ta=ta):
            tm.step()
            ta.step()

        c, m = timed(opt.step, device, reps), timed(baseline, device, reps)
        rows.append(f"| Llama-shaped {model_cfg} | {dtype} | {c:.2f} | {m:.2f} | {c / m:.2f} |")
    return rows


def replay_difference(model_cfg, device) -> tuple[float, float]:
    """Capture one step of ``CompositionalMuon(capturable=True, nonfinite="skip")`` in a CUDA
    graph; replay it 5 times against eager steps of a twin: ``(max |difference|, ms per
    replay)``."""
    torch.manual_seed(0)
    model = Llama(**model_cfg).to(device)
    twin = Llama(**model_cfg).to(device)
    twin.load_state_dict(model.state_dict())
    opt = CompositionalMuon(param_groups(model), lr=0.02, nonfinite="skip", capturable=True)
    ref = CompositionalMuon(param_groups(twin), lr=0.02, nonfinite="skip", capturable=True)
    gen = torch.Generator(device=device).manual_seed(1)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for q in twin.parameters():
        q.grad = torch.zeros_like(q)

    def feed():
        for p, q in zip(model.parameters(), twin.parameters()):
            p.grad.copy_(torch.randn(p.shape, generator=gen, device=device))
            q.grad.copy_(p.grad)

    feed()
    opt.step()  # warm-up outside the graph: state and plan made
    ref.step()
    graph = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        opt.step()  # one more warm-up on the side stream
    torch.cuda.current_stream().wait_stream(s)
    ref.step()
    with torch.cuda.graph(graph):
        opt.step()
    worst = 0.0
    for _ in range(5):
        feed()
        graph.replay()
        ref.step()
        torch.cuda.synchronize()
        worst = max(worst, max((p - q).abs().max().item() for p, q in
                               zip(model.parameters(), twin.parameters())))  # fmt: skip
    return worst, timed(graph.replay, device, 20)


def capture(model_cfg, device) -> list[str]:
    if device != "cuda":
        return ["(no CUDA: capture skipped)"]
    worst, ms = replay_difference(model_cfg, device)
    return [f"captured; 5 replays against eager steps: max |difference| {worst:.3e}; a replay "
            f"takes {ms:.3f} ms"]  # fmt: skip


def host(device, reps) -> list[str]:
    rows = ["| optimizer | ms per step (tiny model) |", "|---|---|"]
    torch.manual_seed(0)
    model = Llama(n=4, d=32).to(device)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    hidden = hidden_matrices(model)
    rest = [p for p in model.parameters() if all(p is not q for q in hidden)]
    tm, ta = torch.optim.Muon(hidden, lr=0.02), torch.optim.AdamW(rest, lr=1e-3, foreach=True)
    cases = {
        "torch.optim.AdamW(foreach=True), every parameter":
            torch.optim.AdamW(model.parameters(), lr=1e-3, foreach=True).step,
        "torch.optim.Muon + AdamW(foreach)": lambda: (tm.step(), ta.step()),
        "CompositionalMuon, nonfinite='raise'":
            CompositionalMuon(param_groups(model), lr=0.02).step,
        "CompositionalMuon, nonfinite='skip'":
            CompositionalMuon(param_groups(model), lr=0.02, nonfinite="skip").step,
    }  # fmt: skip
    for name, fn in cases.items():
        rows.append(f"| {name} | {timed(fn, device, reps):.3f} |")
    return rows


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, the CPU")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out", required=True, help="the markdown report (appended to)")
    args = p.parse_args(argv)
    device = "cpu" if args.dry_run or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.dry_run:
        raise SystemExit("no CUDA device: run on the GPU machine, or use --dry-run")
    if args.dry_run:
        layer, phase_shape, model_cfg, reps = (2, 8, 32), (1, 2, 8, 64), {"n": 1, "d": 32}, 2
    else:
        layer, phase_shape, reps = (32, 128, 4096), (4, 32, 128, 4096), args.reps
        model_cfg = {"n": 4, "d": 1024}
    name = torch.cuda.get_device_name().replace(" ", "_") if device == "cuda" else "cpu"
    date = datetime.now(timezone.utc).strftime("%Y-%m-%d")
    import triton

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def emit(lines: list[str]) -> None:
        text = "\n".join(lines) + "\n"
        print(text, flush=True)
        with out.open("a") as f:
            f.write(text)

    emit([f"# GPU check benchmarks: {name}, {date}", "",
          f"Command: `python3 bench/gpu_check.py {' '.join(argv or sys.argv[1:])}`; torch "
          f"{torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}, "
          f"Python {platform.python_version()}, TRITON_INTERPRET="
          f"{os.environ.get('TRITON_INTERPRET', '0')}. Times: medians of {reps} "
          f"({'CUDA events' if device == 'cuda' else 'perf_counter, a dry run'}), after "
          f"warm-up.", ""])  # fmt: skip
    sections = {
        "1. Compiled kernels against the reference (fp32, relative step difference)":
            lambda: parity(layer, device, FLAGS[:2] if args.dry_run else FLAGS),
        f"2. Kernel against torch per phase, (B, H, dh, n) = {phase_shape}":
            lambda: phases(phase_shape, device, reps),
        "3. The whole step against torch.optim.Muon": lambda: steps(layer, model_cfg, device,
                                                                    reps),
        "4. CUDA-graph capture (capturable=True, nonfinite='skip')":
            lambda: capture(model_cfg, device),
        "5. Host time per step, tiny tensors": lambda: host(device, reps),
    }  # fmt: skip
    for title, run in sections.items():
        t = time.perf_counter()
        try:
            lines = run()
        except Exception:  # noqa: BLE001 - a failed section is reported, the rest still runs
            lines = ["```", traceback.format_exc().strip(), "```"]
        emit([f"## {title}", "", *lines, "", f"({time.perf_counter() - t:.0f} s)", ""])
    return out


if __name__ == "__main__":
    main()
