"""Reading what a compile made: the cubin's resources (``cuobjdump -res-usage``), ``ptxas -v``,
the TTGIR's dots and the TTIR's pointer offsets."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import subprocess
import tempfile

from triton import knobs


@dataclasses.dataclass(frozen=True)
class ResourceUsage:
    """One function's line of ``cuobjdump -res-usage``.

    ``regs``: registers per thread; ``stack``: stack frame bytes per thread (spilled registers
    live here: > 0 means spills); ``local``: other local memory bytes per thread; ``shared``:
    static shared memory bytes (Triton's shared memory is dynamic and is not counted here);
    ``raw``: every ``KEY:value`` pair of the line.
    """

    regs: int
    stack: int
    shared: int
    local: int
    raw: dict[str, int]


_FUNCTION_RE = re.compile(r"^\s*Function\s+(.+?)\s*:\s*$")
_PAIR_RE = re.compile(r"([A-Za-z_]+(?:\[\d+\])?)\s*:\s*(\d+)")


def parse_res_usage(text: str) -> dict[str, ResourceUsage]:
    """Parse ``cuobjdump -res-usage`` output into ``{function name: ResourceUsage}``.

    Robust to the pairs being on the header line or on the following lines, to extra or
    reordered keys, and to the ``Common:`` block and ``Fatbin``/``ELF`` banners (ignored).
    """
    out: dict[str, ResourceUsage] = {}
    current: str | None = None
    pairs: dict[str, int] = {}

    def flush() -> None:
        if current is not None and pairs:
            out[current] = ResourceUsage(
                regs=pairs.get("REG", 0),
                stack=pairs.get("STACK", 0),
                shared=pairs.get("SHARED", 0),
                local=pairs.get("LOCAL", 0),
                raw=dict(pairs),
            )

    for line in text.splitlines():
        header = _FUNCTION_RE.match(line)
        if header is None and re.match(r"^\s*Function\s+\S+:", line):
            # "Function name: REG:.. STACK:.." on one line
            name, _, rest = line.strip()[len("Function") :].partition(":")
            flush()
            current, pairs = name.strip(), {}
            pairs.update({k: int(v) for k, v in _PAIR_RE.findall(rest)})
            continue
        if header is not None:
            flush()
            current, pairs = header.group(1), {}
            continue
        if re.match(r"^\s*(Common|Fatbin|Resource usage|=+)", line):
            flush()
            current, pairs = None, {}
            continue
        if current is not None:
            pairs.update({k: int(v) for k, v in _PAIR_RE.findall(line)})
    flush()
    return out


def _tool(name: str) -> str:
    """Path of a CUDA tool shipped in the Triton wheel (``triton/backends/nvidia/bin``)."""
    tool = getattr(knobs.nvidia, name.replace("-", "_"))
    return tool.path


def cubin_resource_usage(cubin: bytes | str | os.PathLike[str]) -> dict[str, ResourceUsage]:
    """Resource usage of every function in a cubin (bytes or a path), via ``cuobjdump``."""
    with contextlib.ExitStack() as stack:
        if isinstance(cubin, bytes):
            tmp = stack.enter_context(tempfile.NamedTemporaryFile(suffix=".cubin"))
            tmp.write(cubin)
            tmp.flush()
            path = tmp.name
        else:
            path = os.fspath(cubin)
        res = subprocess.run(
            [_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True
        )
    return parse_res_usage(res.stdout)


_PTXAS_STACK_RE = re.compile(
    r"(\d+)\s+bytes stack frame,\s*(\d+)\s+bytes spill stores,\s*(\d+)\s+bytes spill loads"
)
_PTXAS_REGS_RE = re.compile(r"Used\s+(\d+)\s+registers")


def parse_ptxas_log(text: str) -> dict[str, dict[str, int]]:
    """Parse ``ptxas -v`` output: ``{function: {stack_frame, spill_stores, spill_loads, regs}}``."""
    out: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in text.splitlines():
        m = re.search(r"Function properties for\s+(\S+)", line) or re.search(
            r"Compiling entry function '([^']+)'", line
        )
        if m:
            current = m.group(1)
            out.setdefault(current, {})
            continue
        if current is None:
            continue
        if m := _PTXAS_STACK_RE.search(line):
            out[current].update(
                stack_frame=int(m.group(1)),
                spill_stores=int(m.group(2)),
                spill_loads=int(m.group(3)),
            )
        if m := _PTXAS_REGS_RE.search(line):
            out[current]["regs"] = int(m.group(1))
    return out


_DOT_RE = re.compile(r"=\s*(ttng\.warp_group_dot|tt\.dot)\b[^\n]*?->\s*tensor<[^,>]*,\s*#(\w+)")


def dot_kinds(ttgir: str) -> dict[str, int]:
    """How each dot in a TTGIR module is lowered: ``{"wgmma"|"mma"|"fma"|...: count}``.

    ``ttng.warp_group_dot`` is Hopper wgmma; a ``tt.dot`` whose result has an ``#mma`` layout is
    mma.sync (tensor cores); a ``#blocked`` result is the FMA fallback (fp32 ``ieee`` dots), which
    keeps both operands in registers. Counts dots in the IR, not executions.
    """
    out: dict[str, int] = {}
    for op, layout in _DOT_RE.findall(ttgir):
        if op == "ttng.warp_group_dot":
            kind = "wgmma"
        elif layout.startswith("mma"):
            kind = "mma"
        elif layout.startswith("blocked"):
            kind = "fma"
        else:
            kind = layout
        out[kind] = out.get(kind, 0) + 1
    return out


_DEF_RE = re.compile(r"^\s*(%[\w.$-]+)(?::\d+)?\s*=\s*([\w.]+)(.*)$")
_FOR_RE = re.compile(r"^\s*(?:%[\w.$-]+(?::\d+)?\s*=\s*)?scf\.for\s+(%[\w.$-]+)\s*=(.*)$")
_USE_RE = re.compile(r"%[\w.$-]+")
_PID_OPS = ("tt.get_program_id", "tt.get_num_programs")


def narrow_program_offsets(ttir: str) -> list[str]:
    """The scalar pointer offsets of a TTIR module that are 32-bit and computed from a program
    id: each line ``tt.addptr %p, %off : !tt.ptr<...>, i32`` whose ``%off`` derives (through
    any ops, loop bounds included) from ``tt.get_program_id`` / ``tt.get_num_programs``.

    Such an offset (a head's, a batch entry's, a scratch block's: ``pid * stride``) grows with
    the launch and wraps past 2^31 on large batches; offsets of one tile (tensors) stay bounded
    by one block's extent. An empty list: every program-derived scalar offset is 64-bit.
    """
    defs: dict[str, list[list[str]]] = {}
    for line in ttir.splitlines():
        m = _FOR_RE.match(line)
        if m:  # the induction variable derives from the loop's bounds and step
            defs.setdefault(m.group(1), []).append(["scf.for", *_USE_RE.findall(m.group(2))])
        m = _DEF_RE.match(line)
        if m:
            body = m.group(3).split(" : ")[0].split(" loc(")[0]
            uses = [u.split("#")[0] for u in _USE_RE.findall(body)]
            defs.setdefault(m.group(1), []).append([m.group(2), *uses])
    memo: dict[str, bool] = {}

    def from_pid(name: str) -> bool:
        if name not in memo:
            memo[name] = False  # cycles (loop-carried values) end here
            memo[name] = any(
                d[0] in _PID_OPS or any(from_pid(u) for u in d[1:]) for d in defs.get(name, [])
            )
        return memo[name]

    out = []
    for line in ttir.splitlines():
        if "tt.addptr" not in line:
            continue
        types = line.split(" : ", 1)[-1].split(" loc(")[0]
        ptr_type, _, off_type = types.rpartition(", ")
        if not ptr_type.startswith("!tt.ptr") or off_type.strip() != "i32":
            continue
        operands = _USE_RE.findall(line.split("tt.addptr", 1)[1].split(" : ")[0])
        if len(operands) == 2 and from_pid(operands[1]):
            out.append(line.strip())
    return out
