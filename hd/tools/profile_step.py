"""Where a train step's time goes on XLA:CPU: the optimised HLO summarised, a profiler trace aggregated per op.

    python -m hd.tools.profile_step [--config=configs/fashion_mnist.py:teacher] [--out_dir=/tmp/hd_profile]
        [--steps=5] [--warmup=2] [--programs=teacher,block]

Two programs, each compiled once (jax.jit(f).lower(...).compile()):
- `teacher`: the config's teacher train step as hd.bench builds it (hd.bench.train_steps: loss, gradients,
  clipping, AdamW, EMA, the non-finite guard; random parameters and batch);
- `block`: one DiT block of the config's width, heads and token count, forward + backward (jax.vjp with respect
  to its parameters, its tokens and its conditioning, at the config's batch size).
For each, printed (and written to --out_dir, whose files of the same names are replaced: <program>.hlo.txt, the
optimised HLO; <program>_trace/, the profiler trace; profile.json, every figure):
1. the HLO summary: the top-level ops (those the CPU runtime runs as thunks: the entry computation and the
   bodies of its loops and conditionals, not the insides of fusions) counted per kind (fusions per fusion kind;
   kCustom fusions name their backend, e.g. XNNPACK/YNNPACK), every op put in one category (matmul, reduce,
   copy/transpose, elementwise, other; `categorize`), with the bytes each category reads and writes (operand
   and result shapes); the copies, transposes and pure data-movement fusions with their bytes; the dots
   (everywhere, fusions included) and their FLOPs;
2. a jax.profiler trace of --steps steps, parsed from its .xplane.pb with jax.profiler.ProfileData: XLA:CPU's
   thunk runtime emits one event per executed thunk, named after its HLO op (no flag needed), and the work an
   op hands to the intra-op thread pool (an Eigen dot runs there, asynchronously) is traced back to it
   (`trace_op_times`); each op's time is summed over the steps and given the op's category. Ops run concurrently on the two threads of the pool and the client thread, so two clocks: wall
   time (each instant split among the ops running then; sums to the time any op runs) and thread time (summed
   over threads). Printed: each category's share, the costliest ops with the jax op they come from (HLO
   metadata), the costliest copies and transposes, and the matmuls grouped by shape with their rates;
3. the share of the FLOPs that are in matmuls (dots and convolutions counted from the optimised HLO, against
   hd.costs' count of the whole lowered program) beside the share of the op time spent in them, and the rate
   the matmuls themselves reach against the square-matmul peak hd.bench measures (hd.bench.matmul_rate).
Shares are ratios within one run: on a shared machine absolute times are inflated, the shares much less.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import re
import shutil
import statistics
import time
from collections import Counter, defaultdict
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags
from ml_collections import config_flags

from hd import bench
from hd.config import check_values
from hd.costs import cost_dict, lowered_cost
from hd.files import replace_json
from hd.models.dit import DIT_SIZES, DiTBlock

CATEGORIES = ("matmul", "reduce", "copy/transpose", "elementwise", "other")
MATMUL_OPS = {"dot", "convolution"}
REDUCE_OPS = {"reduce", "reduce-window", "select-and-scatter"}
# Ops that only move or rearrange data (no arithmetic): a fusion of nothing else is a copy.
DATA_MOVEMENT_OPS = {"copy", "transpose", "broadcast", "reshape", "slice", "concatenate", "pad", "reverse",
                     "dynamic-slice", "dynamic-update-slice", "gather", "iota"}
# Ops that compute nothing at run time (views, bookkeeping); they have no thunk.
FREE_OPS = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple", "after-all", "partition-id",
            "replica-id", "opt-barrier", "add-dependency"}
ELEMENTWISE_OPS = {"add", "subtract", "multiply", "divide", "maximum", "minimum", "exponential", "log", "tanh",
                   "rsqrt", "sqrt", "negate", "abs", "select", "compare", "convert", "power", "and", "or", "xor",
                   "not", "clamp", "sign", "floor", "ceil", "round-nearest-even", "logistic", "is-finite",
                   "shift-left", "shift-right-logical", "shift-right-arithmetic", "exponential-minus-one",
                   "log-plus-one", "cosine", "sine", "atan2", "remainder", "erf", "cbrt", "tan", "popcnt"}
# Ops whose bodies the runtime runs op by op (their insides are top-level ops too).
CONTROL_FLOW_OPS = {"while", "conditional", "call"}
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
               "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16, "s4": 1, "u4": 1}
_ARRAY = re.compile(r"\b([a-z]+[0-9]*(?:e[0-9]m[0-9]\w*)?)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_NAME = re.compile(r"%([\w.\-]+)")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result shape as written, e.g. "f32[64,49,96]{2,1,0}" or a tuple "(f32[..], s32[])"
    opcode: str
    operands: list[str]
    attributes: str  # everything after the operand list (kind=, calls=, dims, backend_config, ...)

    @property
    def fusion_kind(self) -> str | None:
        m = re.search(r"\bkind=(k\w+)", self.attributes)
        return m.group(1) if m else None

    @property
    def called(self) -> list[str]:
        """Computations this op runs: fusion bodies (calls=), loop bodies and conditions, branches, reducers."""
        out = []
        for key in ("calls", "body", "condition", "to_apply", "true_computation", "false_computation"):
            out += re.findall(rf"\b{key}=%?([\w.\-]+)", self.attributes)
        m = re.search(r"branch_computations=\{([^}]*)\}", self.attributes)
        if m:
            out += _NAME.findall(m.group(1)) or [s.strip() for s in m.group(1).split(",")]
        return out

    @property
    def kind_label(self) -> str:
        """The op kind the summary counts: the opcode, a fusion with its kind (and backend for kCustom)."""
        if self.opcode != "fusion":
            return self.opcode
        kind = self.fusion_kind or "?"
        if kind == "kCustom":
            m = re.search(r'"kind":"_*([\w]+)"', self.attributes)
            return f"fusion {kind} ({m.group(1)})" if m else f"fusion {kind}"
        return f"fusion {kind}"


@dataclasses.dataclass
class HloModule:
    computations: dict[str, list[Instruction]]
    entry: str

    def __post_init__(self):
        self.by_name = {i.name: i for body in self.computations.values() for i in body}

    def top_level(self) -> list[Instruction]:
        """The ops the runtime executes one by one: the entry's and those of the loop bodies, conditions and
        branches it runs (recursively), not the insides of fusions or reducers."""
        out, todo, seen = [], [self.entry], set()
        while todo:
            name = todo.pop(0)
            if name in seen or name not in self.computations:
                continue
            seen.add(name)
            for instr in self.computations[name]:
                out.append(instr)
                if instr.opcode in CONTROL_FLOW_OPS:
                    todo += instr.called
        return out

    def instructions_inside(self, instr: Instruction) -> list[Instruction]:
        """Every instruction of the computations `instr` calls, recursively (a fusion's body, nested fusions,
        reducers)."""
        out, todo, seen = [], list(instr.called), set()
        while todo:
            name = todo.pop()
            if name in seen or name not in self.computations:
                continue
            seen.add(name)
            for inner in self.computations[name]:
                out.append(inner)
                todo += inner.called
        return out

    def opcodes_inside(self, instr: Instruction) -> set[str]:
        return {inner.opcode for inner in self.instructions_inside(instr)}


def _closing(text: str, start: int) -> int:
    """Index of the bracket closing the one at text[start]."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    for i in range(start, len(text)):
        ch = text[i]
        if ch in pairs:
            stack.append(pairs[ch])
        elif stack and ch == stack[-1]:
            stack.pop()
            if not stack:
                return i
    raise ValueError(f"unbalanced brackets in HLO line: {text[:200]}")


def parse_instruction(line: str) -> Instruction | None:
    line = line.strip()
    if line.startswith("ROOT "):
        line = line[5:]
    m = re.match(r"%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        end = _closing(rest, 0)
        shape, rest = rest[: end + 1], rest[end + 1:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    end = _closing(rest, op.end() - 1)
    return Instruction(name=m.group(1), shape=shape, opcode=op.group(1),
                       operands=_NAME.findall(rest[op.end(): end]), attributes=rest[end + 1:])


def parse_hlo(text: str) -> HloModule:
    """The computations of an HLO module's text (as `compiled.as_text()` prints it) and the entry's name."""
    computations, entry, current = {}, None, None
    for line in text.splitlines():
        if not line.strip() or line.startswith("HloModule"):
            continue
        if not line.startswith(" "):
            m = _HEADER.match(line)
            if m:
                current = m.group(2)
                computations[current] = []
                if m.group(1):
                    entry = current
            elif line.startswith("}"):
                current = None
            continue
        if current is not None:
            instr = parse_instruction(line)
            if instr is not None:
                computations[current].append(instr)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text() of one module)")
    return HloModule(computations, entry)


def shape_dims(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in a shape string (a tuple gives several)."""
    return [(dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims in _ARRAY.findall(shape)
            if dtype in DTYPE_BYTES]


def shape_bytes(shape: str) -> int:
    return sum(DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in shape_dims(shape))


def op_bytes(module: HloModule, instr: Instruction) -> int:
    """Bytes an op reads and writes: its operands' shapes plus its result's (each operand once)."""
    return shape_bytes(instr.shape) + sum(shape_bytes(module.by_name[o].shape) for o in set(instr.operands)
                                          if o in module.by_name)


def _is_matmul_custom_call(instr: Instruction) -> bool:
    m = re.search(r'custom_call_target="([^"]*)"', instr.attributes)
    return bool(m) and any(k in m.group(1).lower() for k in ("matmul", "gemm", "conv", "dot"))


def categorize(module: HloModule, instr: Instruction) -> str:
    """One category per op, first match wins: matmul (a dot or convolution, or a fusion holding one: the
    elementwise work fused into it rides along), reduce (a reduction or a fusion holding one: LayerNorm
    statistics, softmax sums, bias and parameter gradients), copy/transpose (a copy, transpose or other
    data-movement op, or a fusion of nothing else), elementwise (any other fusion or arithmetic op), other
    (control flow, custom calls, random bits, scatter, ops without a thunk)."""
    op = instr.opcode
    if op in MATMUL_OPS or (op == "custom-call" and _is_matmul_custom_call(instr)):
        return "matmul"
    if op == "fusion":
        inside = module.opcodes_inside(instr)
        if inside & MATMUL_OPS or any(_is_matmul_custom_call(i) for i in module.instructions_inside(instr)
                                      if i.opcode == "custom-call"):
            return "matmul"
        if inside & REDUCE_OPS:
            return "reduce"
        if inside <= DATA_MOVEMENT_OPS | FREE_OPS:
            return "copy/transpose"
        return "elementwise"
    if op in REDUCE_OPS:
        return "reduce"
    if op in DATA_MOVEMENT_OPS:
        return "copy/transpose"
    if op in ELEMENTWISE_OPS:
        return "elementwise"
    return "other"


def matmul_flops(module: HloModule, instr: Instruction) -> float:
    """2 x multiply-adds of one dot or convolution, from its result and operand shapes."""
    out = math.prod(shape_dims(instr.shape)[0][1])
    if instr.opcode == "dot":
        lhs = shape_dims(module.by_name[instr.operands[0]].shape)[0][1]
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", instr.attributes)
        contracted = [int(d) for d in m.group(1).split(",") if d] if m else []
        return 2.0 * out * math.prod(lhs[d] for d in contracted)
    if instr.opcode == "convolution":
        kernel = shape_dims(module.by_name[instr.operands[1]].shape)[0][1]
        labels = re.search(r"dim_labels=\w+_(\w+)->", instr.attributes).group(1)
        return 2.0 * out * math.prod(kernel) / kernel[labels.index("o")]
    raise ValueError(f"{instr.name} is a {instr.opcode}, not a dot or convolution")


def matmul_signature(module: HloModule, instr: Instruction) -> str:
    """A dot as `lhs x rhs -> result` with its contracting (c) and batch (b) dimensions, lhs|rhs, e.g.
    "[3136,96]x[384,96] c1|1 -> [3136,384]": the layout the operands were left in."""
    dims = lambda name: str(list(shape_dims(module.by_name[name].shape)[0][1])).replace(" ", "")
    out = str(list(shape_dims(instr.shape)[0][1])).replace(" ", "")
    if instr.opcode != "dot":
        return f"{instr.opcode} {dims(instr.operands[0])}x{dims(instr.operands[1])} -> {out}"
    get = lambda key: (re.search(rf"{key}=\{{([0-9,]*)\}}", instr.attributes) or [None, ""])[1]
    batch = f" b{get('lhs_batch_dims')}|{get('rhs_batch_dims')}" if get("lhs_batch_dims") else ""
    return (f"{dims(instr.operands[0])}x{dims(instr.operands[1])} c{get('lhs_contracting_dims')}|"
            f"{get('rhs_contracting_dims')}{batch} -> {out}")


def _move_kind(instr: Instruction) -> str:
    return "fusion of data movement" if instr.opcode == "fusion" else instr.opcode


def hlo_summary(text: str) -> dict[str, Any]:
    """Counts and bytes of the top-level ops per kind and category, the data-movement ops, and every dot and
    convolution of the module (fusions included) with their FLOPs."""
    module = parse_hlo(text)
    ops = [i for i in module.top_level() if i.opcode not in FREE_OPS]
    kinds = Counter(i.kind_label for i in ops)
    categories = {c: {"count": 0, "bytes": 0} for c in CATEGORIES}
    per_op = {}
    for instr in ops:
        category = categorize(module, instr)
        nbytes = op_bytes(module, instr)
        categories[category]["count"] += 1
        categories[category]["bytes"] += nbytes
        source = re.search(r'op_name="([^"]*)"', instr.attributes)
        per_op[instr.name] = {"category": category, "kind": instr.kind_label, "shape": instr.shape.split("{")[0],
                              "bytes": nbytes, "source": source.group(1) if source else ""}
        if category == "matmul":  # the dots it runs (itself, or those inside the fusion) and their FLOPs
            dots = [instr] if instr.opcode in MATMUL_OPS else [i for i in module.instructions_inside(instr)
                                                               if i.opcode in MATMUL_OPS]
            per_op[instr.name]["flops"] = sum(matmul_flops(module, d) for d in dots)
            per_op[instr.name]["dots"] = [matmul_signature(module, d) for d in dots]
            per_op[instr.name]["fused_ops"] = sorted(module.opcodes_inside(instr) - MATMUL_OPS - FREE_OPS)
    moves = [i for i in ops if categorize(module, i) == "copy/transpose"]
    transposing = [i for i in ops if i.opcode == "fusion" and categorize(module, i) != "copy/transpose"
                   and "transpose" in module.opcodes_inside(i)]
    matmuls = [i for body in module.computations.values() for i in body if i.opcode in MATMUL_OPS]
    return {
        "top_level_ops": len(ops),
        "kinds": dict(kinds.most_common()),
        "categories": categories,
        "data_movement": {
            "count": len(moves), "bytes": sum(op_bytes(module, i) for i in moves),
            "by_kind": {kind: {"count": sum(1 for _ in group), "bytes": sum(op_bytes(module, i) for i in group)}
                        for kind in sorted({_move_kind(i) for i in moves})
                        for group in [[i for i in moves if _move_kind(i) == kind]]},
            "transposes_or_copies_inside_other_fusions": len(transposing)},
        "matmuls": {"dot": sum(i.opcode == "dot" for i in matmuls),
                    "convolution": sum(i.opcode == "convolution" for i in matmuls),
                    "inside_fusions": sum(i.name not in {o.name for o in ops} for i in matmuls),
                    "flops": sum(matmul_flops(module, i) for i in matmuls)},
        "ops": per_op,
    }


# ----------------------------------------------------------------------------------------------- the trace


def _enclosing(intervals: list[tuple], points: list[tuple]) -> dict:
    """{point id: payload of the innermost interval (start, end, payload) enclosing the point (t, id)}, or None;
    the intervals of one thread nest (a thread runs one thing at a time), so one sweep finds them."""
    intervals = sorted(intervals, key=lambda i: (i[0], -i[1]))
    out, stack, i = {}, [], 0
    for t, key in sorted(points, key=lambda p: p[0]):
        while i < len(intervals) and intervals[i][0] <= t:
            while stack and stack[-1][1] <= intervals[i][0]:
                stack.pop()
            stack.append(intervals[i])
            i += 1
        while stack and stack[-1][1] <= t:
            stack.pop()
        out[key] = stack[-1][2] if stack else None
    return out


RUNTIME = "(runtime)"  # time in thread-pool tasks and executor work that no op of the module scheduled
# The PjRt client thread that starts a program runs thunks, then blocks in this event until the program ends:
# blocked time, not work.
WAIT_EVENT = "ThunkExecutor::Execute (wait for completion)"
IDLE = "(blocked)"


def trace_op_times(xplane_path: str, module_name: str) -> dict[str, Any]:
    """Time (ns) of every op of the HLO module `module_name` in one .xplane.pb, summed over the runs it holds:
    thread time (summed over threads; a thread descheduled by another process still counts) and wall time
    (each instant split among the ops running then, `_split_wall`).

    XLA:CPU's thunk executor emits one event per thunk, named after its HLO op (stat hlo_op), on the thread
    that runs it. That event is not all of the op's time: a multi-threaded op (an Eigen dot, which runs
    asynchronously, or a loop fusion split in partitions) hands tasks to the intra-op thread pool, seen as
    ThreadpoolListener events: a Record (flow id _p) on the thread that schedules a task, a StartRegion (flow
    id _c) ... StopRegion where a pool thread runs it. So every interval on a thread (a thunk event, a task
    region) gets an owner: a thunk event owns itself; a task region belongs to the owner of whatever enclosed
    its Record (followed through tasks that schedule tasks). Each thread's time then goes to the innermost
    interval's owner (self time: a task region holding a thunk event keeps only the rest). Task time that no
    op scheduled (the executor picking the next thunks) is RUNTIME; a thread blocked waiting for the program's
    end (WAIT_EVENT) is not counted.
    Returns {"ops": {op or RUNTIME: thread ns}, "wall": {op or RUNTIME: wall ns}, "runs": executions seen,
    "events": thunk events, "tasks": task regions}."""
    data = jax.profiler.ProfileData.from_file(xplane_path)
    threads = []  # per thread: (thunk events [(start, end, op)], regions [(start, end, id)], records [(t, id)])
    runs = set()
    for plane in data.planes:
        if not plane.name.startswith("/host:CPU"):
            continue
        for line in plane.lines:
            thunks, regions, records, open_regions = [], [], [], []
            for ev in sorted(line.events, key=lambda e: e.start_ns):
                stats = dict(ev.stats)
                if ev.name == "ThreadpoolListener::Record" and "_p" in stats:
                    records.append((ev.start_ns, stats["_p"]))
                elif ev.name == "ThreadpoolListener::StartRegion":
                    open_regions.append((ev.start_ns, stats.get("_c")))
                elif ev.name == "ThreadpoolListener::StopRegion" and open_regions:
                    begin, task = open_regions.pop()
                    regions.append((begin, ev.start_ns, task))
                elif ev.name.startswith(WAIT_EVENT):  # a thread blocked on the rest of the program
                    thunks.append((ev.start_ns, ev.start_ns + ev.duration_ns, IDLE))
                elif stats.get("hlo_module") == module_name and "hlo_op" in stats:
                    thunks.append((ev.start_ns, ev.start_ns + ev.duration_ns, str(stats["hlo_op"])))
                    runs.add(stats.get("run_id"))
            threads.append((thunks, regions, records))

    # Who scheduled each task: the thunk or task enclosing its Record on the scheduling thread.
    scheduled_by = {}
    for thunks, regions, records in threads:
        tagged = [(b, e, ("op", op)) for b, e, op in thunks] + [(b, e, ("task", k)) for b, e, k in regions]
        scheduled_by.update(_enclosing(tagged, records))

    def owner(task, depth=0):
        parent = scheduled_by.get(task)
        if parent is None or depth > 1000:
            return RUNTIME
        return parent[1] if parent[0] == "op" else owner(parent[1], depth + 1)

    thread_ns, segments = defaultdict(float), []
    for thunks, regions, _ in threads:
        for begin, finish, who in _innermost_segments([*thunks, *((b, e, owner(k)) for b, e, k in regions)]):
            if who != IDLE:
                thread_ns[who] += finish - begin
                segments.append((begin, finish, who))
    return {"ops": dict(thread_ns), "wall": _split_wall(segments), "runs": len(runs),
            "events": sum(len(t[0]) for t in threads), "tasks": sum(len(t[1]) for t in threads)}


def _innermost_segments(intervals: list[tuple]) -> list[tuple]:
    """One thread's nested intervals (start, end, owner) cut into pieces (start, end, owner of the innermost
    interval there); time outside every interval is left out."""
    out, stack, cursor = [], [], None  # stack: [end, owner] of the open intervals, innermost last
    for begin, finish, who in sorted(intervals, key=lambda i: (i[0], -i[1])):
        while stack and stack[-1][0] <= begin:
            end, owner = stack.pop()
            out.append((cursor, end, owner))
            cursor = end
        if stack:
            out.append((cursor, begin, stack[-1][1]))
            finish = min(finish, stack[-1][0])  # a child never outlives its parent on one thread
        stack.append((finish, who))
        cursor = begin
    while stack:
        end, owner = stack.pop()
        out.append((cursor, end, owner))
        cursor = end
    return [s for s in out if s[1] > s[0]]


def _split_wall(segments: list[tuple]) -> dict[str, float]:
    """Wall time (ns) per owner: each instant at which k pieces run (on any threads) gives 1/k to each."""
    edges = sorted([(b, 1, who) for b, _, who in segments] + [(e, -1, who) for _, e, who in segments],
                   key=lambda x: (x[0], x[1]))
    wall, active, last = defaultdict(float), Counter(), None
    for t, delta, who in edges:
        n = sum(active.values())
        if n and last is not None and t > last:
            for owner, k in active.items():
                wall[owner] += (t - last) * k / n
        last = t
        active[who] += delta
        if not active[who]:
            del active[who]
    return dict(wall)


def profile_program(fn: Callable, args: tuple, name: str, out_dir: str, *, steps: int, warmup: int,
                    donate: bool = False) -> dict[str, Any]:
    """Compile fn (named `name`, so its HLO module is jit_<name>), write its optimised HLO, run warmup + steps
    calls under jax.profiler.trace and aggregate the thunk events; the wall time of each traced step too."""
    def program(*a):
        return fn(*a)

    program.__name__ = name
    jitted = jax.jit(program, donate_argnums=(0,) if donate else ())
    compiled = jitted.lower(*args).compile()
    text = compiled.as_text()
    with open(os.path.join(out_dir, f"{name}.hlo.txt"), "w") as f:
        f.write(text)
    module_name = re.match(r"HloModule\s+([\w.\-]+)", text).group(1)

    def call(a):  # a donated first argument is replaced by the step's new state
        out = compiled(*a)
        jax.block_until_ready(out)
        return (out[0], *a[1:]) if donate else a

    for _ in range(warmup):
        args = call(args)
    trace_dir = os.path.join(out_dir, f"{name}_trace")
    shutil.rmtree(trace_dir, ignore_errors=True)
    walls = []
    with jax.profiler.trace(trace_dir):
        for _ in range(steps):
            t0 = time.perf_counter()
            args = call(args)
            walls.append(time.perf_counter() - t0)
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not paths:
        raise RuntimeError(f"jax.profiler.trace wrote no .xplane.pb under {trace_dir}")
    times = trace_op_times(max(paths, key=os.path.getmtime), module_name)
    if times["events"] == 0:
        raise RuntimeError(f"the trace holds no thunk event of {module_name}: this jaxlib's XLA:CPU does not "
                           "emit per-op events (they come from the thunk runtime's executor)")
    return {"compiled": compiled, "hlo_text": text, "module": module_name, "times": times,
            "step_s": walls, "flops_compiled": float(cost_dict(compiled.cost_analysis()).get("flops", float("nan")))}


def time_by_category(summary: dict, times: dict) -> dict[str, Any]:
    """Per step: the wall time (instants shared among the ops running then) and the thread time of each
    category and of the runtime, their shares, the costliest ops, and each matmul op's time and rate (its FLOPs
    over its wall time: comparable with the whole machine's matmul peak). Ops of the trace missing from the HLO
    (none expected) count as other."""
    ops, runs = summary["ops"], max(times["runs"], 1)
    rows = (*CATEGORIES, "runtime")
    out, unmatched = {}, set()
    for clock in ("wall", "ops"):
        per = {c: 0.0 for c in rows}
        for name, ns in times[clock].items():
            if name == RUNTIME:
                per["runtime"] += ns / runs
            elif name in ops:
                per[ops[name]["category"]] += ns / runs
            else:
                per["other"] += ns / runs
                unmatched.add(name)
        total = sum(per.values())
        label = "wall" if clock == "wall" else "thread"
        out[f"{label}_ns_per_step"] = per
        out[f"{label}_total_ns_per_step"] = total
        out[f"{label}_share"] = {c: v / total if total else float("nan") for c, v in per.items()}
    wall = {name: ns / runs for name, ns in times["wall"].items()}
    total = out["wall_total_ns_per_step"]
    out["unmatched_ops"] = sorted(unmatched)
    out["top"] = [{"op": name, "wall_us_per_step": ns / 1e3, "share": ns / total,
                   **({k: ops[name][k] for k in ("category", "kind", "shape", "source")} if name in ops else {})}
                  for name, ns in sorted(wall.items(), key=lambda kv: -kv[1])[:20]]
    out["data_movement"] = sorted(({"op": name, "wall_us_per_step": wall.get(name, 0.0) / 1e3, "shape": r["shape"],
                                    "bytes": r["bytes"]} for name, r in ops.items()
                                   if r["category"] == "copy/transpose"), key=lambda r: -r["wall_us_per_step"])
    # Matmul ops grouped by what they compute (the same dots, e.g. one per block), costliest first.
    groups = defaultdict(lambda: {"ops": 0, "wall_ns": 0.0, "flops": 0.0})
    for name, r in ops.items():
        if r["category"] == "matmul":
            g = groups[("; ".join(r["dots"]), ",".join(r["fused_ops"]))]
            g["ops"] += 1
            g["wall_ns"] += wall.get(name, 0.0)
            g["flops"] += r["flops"]
    out["matmuls"] = sorted(({"dots": dots, "fused_ops": fused, "ops": g["ops"], "wall_us_per_step": g["wall_ns"] / 1e3,
                              "flops": g["flops"],
                              "gflop_per_s": g["flops"] / g["wall_ns"] if g["wall_ns"] else None}
                             for (dots, fused), g in groups.items()), key=lambda r: -r["wall_us_per_step"])
    return out


# ---------------------------------------------------------------------------------------- the two programs


def teacher_program(config: ml_collections.ConfigDict) -> tuple[Callable, tuple]:
    """The teacher train step and its (state, batch, frozen) exactly as hd.bench times it."""
    fn, args = bench.train_steps(config, bench.data_shape(config), stages=("teacher",))["teacher"]
    return fn, args


def block_program(config: ml_collections.ConfigDict, seed: int = 0) -> tuple[Callable, tuple]:
    """One DiT block of the config's model, forward + backward: (params, x, c, cotangent) -> (output,
    gradients with respect to params, tokens x [B, N, D] and conditioning c [B, D]). Non-zero adaLN weights (a fresh block's
    are zero) so that no product is trivially zero."""
    if config.model.name != "dit":
        raise ValueError(f"model.name={config.model.name!r}: the block program needs a DiT (config.model.name)")
    hidden, _, heads = DIT_SIZES[config.model.size]
    shape = bench.data_shape(config)
    tokens = (shape[0] // config.model.patch_size) ** 2
    block = DiTBlock(hidden, heads, config.model.mlp_ratio, jnp.dtype(config.model.dtype),
                     config.model.get("attention", "plain"))
    kx, kc, kg, kp = jax.random.split(jax.random.PRNGKey(seed), 4)
    x = jax.random.normal(kx, (config.batch_size, tokens, hidden), jnp.float32)
    c = jax.random.normal(kc, (config.batch_size, hidden), jnp.float32)
    g = jax.random.normal(kg, x.shape, jnp.float32)
    params = bench.signal_params(block.init(kp, x, c)["params"], seed)

    def block_fwd_bwd(params, x, c, g):
        # The block's output is returned as in a network, where the next block reads it: XLA may not drop it.
        out, vjp = jax.vjp(lambda p, x, c: block.apply({"params": p}, x, c), params, x, c)
        return out, vjp(g)

    return block_fwd_bwd, (params, x, c, g)


def block_matmul_flops(batch: int, tokens: int, hidden: int, heads: int, mlp_ratio: float) -> float:
    """Matmul FLOPs of one DiT block's forward pass: adaLN (6 D outputs per example), qkv, attention logits and
    weighted sum, output projection, the two MLP layers. Its backward holds twice as many."""
    mlp = int(hidden * mlp_ratio)
    per_token = 3 * hidden * hidden + hidden * hidden + 2 * hidden * mlp  # qkv, proj, fc1, fc2
    attention = 2 * tokens * tokens * hidden  # q k^T and w v, summed over heads (heads x head_dim = hidden)
    return 2.0 * (batch * 6 * hidden * hidden + batch * tokens * per_token + batch * attention)


# ----------------------------------------------------------------------------------------------- reporting


def analyse(name: str, fn: Callable, args: tuple, out_dir: str, *, steps: int, warmup: int, donate: bool,
            peak: float | None) -> dict[str, Any]:
    run = profile_program(fn, args, name, out_dir, steps=steps, warmup=warmup, donate=donate)
    summary = hlo_summary(run["hlo_text"])
    times = time_by_category(summary, run["times"])
    flops = lowered_cost(fn, args)["flops"]
    matmul_time = times["wall_ns_per_step"]["matmul"] * 1e-9
    report = {
        "program": name, "module": run["module"], "steps_traced": len(run["step_s"]),
        "step_ms_median": statistics.median(run["step_s"]) * 1e3,
        "busy_wall_ms_per_step": times["wall_total_ns_per_step"] / 1e6,
        "thread_ms_per_step": times["thread_total_ns_per_step"] / 1e6,
        "flops": flops, "flops_compiled": run["flops_compiled"],
        "matmul_flops": summary["matmuls"]["flops"],
        "matmul_flop_share": summary["matmuls"]["flops"] / flops,
        "matmul_time_share": times["wall_share"]["matmul"],
        "matmul_flops_per_s": summary["matmuls"]["flops"] / matmul_time if matmul_time else float("nan"),
        "peak_flops_per_s": peak,
        "hlo": {k: v for k, v in summary.items() if k != "ops"},
        "time": times,
    }
    report["matmul_fraction_of_peak"] = report["matmul_flops_per_s"] / peak if peak else None
    return report


def table(report: dict) -> str:
    h, t = report["hlo"], report["time"]
    lines = [f"== {report['program']} ({report['module']}): {report['steps_traced']} steps traced, median "
             f"{report['step_ms_median']:.1f} ms/step; in the trace per step {report['busy_wall_ms_per_step']:.1f} ms "
             f"with an op running, {report['thread_ms_per_step']:.1f} ms of thread time",
             f"top-level ops: {h['top_level_ops']}  (" + ", ".join(f"{k} {v}" for k, v in h["kinds"].items()) + ")",
             f"{'category':<16}{'ops':>6}{'MiB moved':>11}{'wall ms':>9}{'wall share':>12}{'thread share':>14}"]
    for c in (*CATEGORIES, "runtime"):
        count, moved = ((h["categories"][c]["count"], f"{h['categories'][c]['bytes'] / 2 ** 20:.1f}")
                        if c in h["categories"] else ("", ""))
        lines.append(f"{c:<16}{count:>6}{moved:>11}{t['wall_ns_per_step'][c] / 1e6:>9.2f}"
                     f"{t['wall_share'][c]:>12.1%}{t['thread_share'][c]:>14.1%}")
    dm = h["data_movement"]
    lines.append(f"copy/transpose ops: {dm['count']} ("
                 + ", ".join(f"{k} {v['count']}: {v['bytes'] / 2 ** 20:.1f} MiB" for k, v in dm["by_kind"].items())
                 + f"), {dm['bytes'] / 2 ** 20:.1f} MiB read + written; other fusions holding a transpose: "
                 f"{dm['transposes_or_copies_inside_other_fusions']}")
    lines.append("costliest copy/transpose ops: " + "; ".join(
        f"{r['op']} {r['shape']} {r['wall_us_per_step']:.0f} us" for r in t["data_movement"][:6]))
    m = h["matmuls"]
    lines.append(f"matmuls: {m['dot']} dots + {m['convolution']} convolutions ({m['inside_fusions']} inside "
                 f"fusions), {m['flops'] / 1e9:.3f} GFLOP of {report['flops'] / 1e9:.3f} GFLOP "
                 f"(hd.costs, lowered; compiled count {report['flops_compiled'] / 1e9:.3f})")
    if "matmul_flops_expected" in report:
        lines.append(f"matmul FLOPs expected from the block's shapes (3 x forward): "
                     f"{report['matmul_flops_expected'] / 1e9:.3f} GFLOP")
    line = (f"FLOPs in matmuls {report['matmul_flop_share']:.1%}, wall time in matmuls "
            f"{report['matmul_time_share']:.1%}: matmuls run at {report['matmul_flops_per_s'] / 1e9:.1f} GFLOP/s")
    if report["matmul_fraction_of_peak"] is not None:
        line += (f" = {report['matmul_fraction_of_peak']:.0%} of the {report['peak_flops_per_s'] / 1e9:.1f} "
                 "GFLOP/s square-matmul peak")
    lines.append(line)
    lines.append(f"{'op':<30}{'wall us':>9}{'share':>7}  {'category':<15}{'kind':<28}{'shape':<22}source (jax op)")
    for r in t["top"]:
        lines.append(f"{r['op']:<30}{r['wall_us_per_step']:>9.0f}{r['share']:>7.1%}  {r.get('category', '-'):<15}"
                     f"{r.get('kind', '-'):<28}{r.get('shape', ''):<22}{r.get('source', '')[-70:]}")
    lines.append(f"{'matmul ops':>10}{'wall us':>9}{'MFLOP':>8}{'GFLOP/s':>9}  dots (lhs x rhs, contracting|batch "
                 "dims) + fused ops")
    for r in t["matmuls"]:
        rate = f"{r['gflop_per_s']:>9.1f}" if r["gflop_per_s"] else f"{'-':>9}"
        lines.append(f"{r['ops']:>10}{r['wall_us_per_step']:>9.0f}{r['flops'] / 1e6:>8.1f}{rate}  {r['dots']}"
                     + (f" + {r['fused_ops']}" if r["fused_ops"] else ""))
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    programs = tuple(_PROGRAMS.value)
    unknown = set(programs) - {"teacher", "block"}
    if unknown:
        raise app.UsageError(f"--programs: unknown {sorted(unknown)}; choose from teacher, block")
    if "block" in programs and config.model.name != "dit":
        raise app.UsageError(f"--programs=block needs a DiT config (model.name is {config.model.name!r}); "
                             "drop block from --programs or pick a DiT config")
    if _STEPS.value < 1 or _WARMUP.value < 1:
        raise app.UsageError("--steps and --warmup must be at least 1 (the first call's first-touch costs are "
                             "not the step's)")
    check_values(config, jax.device_count())  # a bad override fails here, before any compile
    os.makedirs(_OUT_DIR.value, exist_ok=True)
    peak = bench.matmul_rate(_MATMUL_SIZE.value, config.model.dtype) if _MATMUL_SIZE.value else None
    reports = {}
    for name in programs:
        fn, args = teacher_program(config) if name == "teacher" else block_program(config)
        reports[name] = analyse(name, fn, args, _OUT_DIR.value, steps=_STEPS.value, warmup=_WARMUP.value,
                                donate=name == "teacher", peak=peak)
    if "block" in reports:  # a check of the HLO count: every dot of the block found, none counted twice
        hidden, _, heads = DIT_SIZES[config.model.size]
        tokens = (bench.data_shape(config)[0] // config.model.patch_size) ** 2
        reports["block"]["matmul_flops_expected"] = 3 * block_matmul_flops(config.batch_size, tokens, hidden, heads,
                                                                          config.model.mlp_ratio)
    replace_json(os.path.join(_OUT_DIR.value, "profile.json"), reports)
    device = jax.devices()[0]
    print(f"{config.model.name} {config.model.size}/p{config.model.patch_size}, batch {config.batch_size}, "
          f"{config.model.dtype}, on {device.platform} ({device.device_kind}), jax {jax.__version__}; "
          f"HLO, traces and profile.json in {_OUT_DIR.value}")
    for report in reports.values():
        print(table(report))


if __name__ == "__main__":  # flags only here: importing this module (tests) defines none
    _CONFIG = config_flags.DEFINE_config_file("config", "configs/fashion_mnist.py:teacher",
                                              "Config file and variant whose model and batch are profiled.")
    _OUT_DIR = flags.DEFINE_string("out_dir", "/tmp/hd_profile",
                                   "Where the optimised HLO, the traces and profile.json go (overwritten).")
    _STEPS = flags.DEFINE_integer("steps", 5, "Steps traced per program.")
    _WARMUP = flags.DEFINE_integer("warmup", 2, "Untraced steps before the trace.")
    _PROGRAMS = flags.DEFINE_list("programs", ["teacher", "block"], "Programs to profile: teacher, block.")
    _MATMUL_SIZE = flags.DEFINE_integer("matmul_size", 2048,
                                        "Side of the square matmul giving the peak rate (0: skip it).")
    app.run(main)
