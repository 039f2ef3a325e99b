"""What a compiled program costs: FLOPs, memory and collective traffic.

Used by ``--mode=plan`` and the benchmarks to size full-size programs built
abstractly on simulated devices: nothing here runs the program.
"""

from __future__ import annotations

import math
import re
from typing import Any


def jaxpr_flops(closed_jaxpr) -> dict[str, float]:
    """FLOPs of every ``dot_general`` / ``conv`` in a (closed) jaxpr, loops unrolled.

    XLA's ``cost_analysis()`` counts a while-loop body once, whatever its trip
    count (our trajectory and train step are ``lax.scan``s over steps, blocks and
    timestep chunks); here ``scan`` bodies are multiplied by their length and
    ``cond`` takes the most expensive branch. A ``while`` with an unknown trip
    count is counted once and flagged.
    """
    import numpy as np
    from jax.extend import core as jcore

    stats = {"dot_flops": 0.0, "unknown_while_loops": 0}

    def sub_jaxprs(params):
        for v in params.values():
            items = v if isinstance(v, (tuple, list)) else (v,)
            for it in items:
                if isinstance(it, jcore.ClosedJaxpr):
                    yield it.jaxpr
                elif isinstance(it, jcore.Jaxpr):
                    yield it

    def walk(jaxpr, mult: float) -> None:
        for eqn in jaxpr.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (_, rc), (_, rb) = eqn.params["dimension_numbers"]
                lhs, rhs = (np.array(v.aval.shape) for v in eqn.invars)
                free_r = [d for i, d in enumerate(rhs) if i not in rc and i not in rb]
                stats["dot_flops"] += mult * 2.0 * float(np.prod(lhs)) * float(np.prod(free_r))
            elif name == "conv_general_dilated":
                out = np.array(eqn.outvars[0].aval.shape)
                rhs = np.array(eqn.invars[1].aval.shape)
                stats["dot_flops"] += mult * 2.0 * float(np.prod(out)) * float(np.prod(rhs)) / rhs[0]
            elif name == "scan":
                walk(eqn.params["jaxpr"].jaxpr, mult * eqn.params["length"])
            elif name == "cond":
                before = stats["dot_flops"]
                costs = []
                for br in eqn.params["branches"]:
                    stats["dot_flops"] = 0.0
                    walk(br.jaxpr, mult)
                    costs.append(stats["dot_flops"])
                stats["dot_flops"] = before + max(costs)
            elif name == "while":
                stats["unknown_while_loops"] += 1
                walk(eqn.params["body_jaxpr"].jaxpr, mult)
            else:
                for sub in sub_jaxprs(eqn.params):
                    walk(sub, mult)

    walk(closed_jaxpr.jaxpr, 1.0)
    return stats


def memory_stats(compiled) -> dict[str, int] | None:
    ma = compiled.memory_analysis()
    if ma is None:
        return None
    keys = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
            "temp_size_in_bytes", "generated_code_size_in_bytes")
    out = {k.replace("_size_in_bytes", "_bytes"): int(getattr(ma, k)) for k in keys}
    out["peak_estimate_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                                  - out["alias_bytes"] + out["temp_bytes"])
    return out



# Bytes per element of HLO element types.
_HLO_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
              "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
              "f8e4m3fn": 1, "f8e5m2": 1}
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
_COMPUTATION = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*\(.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*?)\s+([a-z][\w\-]*)\(")
_SHAPE = re.compile(r"\b(" + "|".join(_HLO_BYTES) + r")\[([\d,]*)\]")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_CALLEES = re.compile(r"(?:body|calls|to_apply|branch_computations)=\{?([%\w.\-, ]+)\}?")


def _shape_bytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        n = 1
        for d in dims.split(","):
            if d:
                n *= int(d)
        total += n * _HLO_BYTES[dtype]
    return total


def _instruction(line: str) -> tuple[str, str, str | None] | None:
    """``(op, result type, collective or None)`` of an HLO instruction line; None otherwise.

    An async pair counts once, at its ``-start``.
    """
    m = _INSTRUCTION.match(line)
    if not m:
        return None
    result_type, op = m.groups()
    base = op.removesuffix("-start")
    return op, result_type, base if base in COLLECTIVES and not op.endswith("-done") else None


def collective_shapes(hlo_text: str) -> list[tuple[str, list[tuple[int, ...]]]]:
    """Every collective instruction of an HLO module as ``(op, result shapes)``, once each."""
    out = []
    for line in hlo_text.splitlines():
        parsed = _instruction(line)
        if parsed and parsed[2]:
            shapes = [tuple(int(d) for d in dims.split(",") if d) for _, dims in _SHAPE.findall(parsed[1])]
            out.append((parsed[2], shapes))
    return out


GRADIENT_ALL_REDUCE = "all-reduce (gradients)"
_OP_NAME = re.compile(r'op_name="([^"]*)"')


def _gradient_bytes(line: str, result_type: str, shapes: set[tuple[int, ...]]) -> int:
    """Bytes of an all-reduce's results that are sharded parameters' gradients: the
    all-reduce belongs to the backward pass (JAX names it ``transpose(jvp(...))``)
    and the result has a sharded parameter's shape (any dimension order). XLA
    combines many gradients into one tuple all-reduce; each result counts alone."""
    name = _OP_NAME.search(line)
    if name is None or "transpose(" not in name.group(1):
        return 0
    total = 0
    for dtype, dims in _SHAPE.findall(result_type):
        dims = [int(d) for d in dims.split(",") if d]
        if dims and tuple(sorted(dims)) in shapes:
            total += math.prod(dims) * _HLO_BYTES[dtype]
    return total


def collective_bytes(hlo_text: str, *, gradient_shapes: Any = ()) -> dict[str, Any]:
    """Output bytes of every collective in an optimized, partitioned HLO module,
    per device and per execution of the program, loops multiplied out.

    While loops count ``known_trip_count`` times (XLA annotates the loops it
    derives from ``scan``); one without it is counted once and reported. Async
    pairs count once (at ``-start``).

    ``gradient_shapes`` (the shapes of the sharded parameters, and of one layer
    of stacked ones): backward-pass all-reduces of exactly such shapes are
    reported apart, as ``"all-reduce (gradients)"`` (a tuple all-reduce result by result). XLA's CPU compiler keeps a
    sharded weight's gradient as a whole-size all-reduce followed by a slice;
    the GPU and TPU compilers turn that pattern into a reduce-scatter
    (``ReduceScatterCreator``), whose output is one shard: a simulated plan
    must tell the two apart to say what a pod would move.

    Returns:
      ``{"total": bytes, "<collective>": bytes, ..., "unknown_trip_counts": n}``.
    """
    shapes = {tuple(sorted(int(d) for d in s)) for s in gradient_shapes}
    computations: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m:
            current = m.group(2)
            computations[current] = []
            if m.group(1):
                entry = current
            continue
        if current is not None:
            if line.strip() == "}":
                current = None
            else:
                computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation in the HLO text")
    unknown = 0
    memo: dict[str, dict[str, float]] = {}

    def total(name: str) -> dict[str, float]:
        nonlocal unknown
        if name in memo:
            return memo[name]
        memo[name] = {}  # guards against (impossible) recursion
        acc: dict[str, float] = {}
        for line in computations.get(name, ()):
            parsed = _instruction(line)
            if parsed is None:
                continue
            op, result_type, collective = parsed
            if collective:
                moved = _shape_bytes(result_type)
                if collective == "all-reduce" and shapes:
                    grads = _gradient_bytes(line, result_type, shapes)
                    if grads:
                        acc[GRADIENT_ALL_REDUCE] = acc.get(GRADIENT_ALL_REDUCE, 0.0) + grads
                        moved -= grads
                acc[collective] = acc.get(collective, 0.0) + moved
            times = 1
            if op == "while":
                trip = _TRIP.search(line)
                if trip is None:
                    unknown += 1
                else:
                    times = int(trip.group(1))
            for callees in _CALLEES.findall(line):
                for callee in callees.split(","):
                    callee = callee.strip().lstrip("%")
                    if callee in computations and callee != name:
                        for k, v in total(callee).items():
                            acc[k] = acc.get(k, 0.0) + times * v
        memo[name] = acc
        return acc

    out = dict(total(entry))
    out = {k: int(v) for k, v in out.items()}
    out["total"] = int(sum(out.values()))
    out["unknown_trip_counts"] = unknown
    return out
