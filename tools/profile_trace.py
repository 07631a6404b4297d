#!/usr/bin/env python
"""Where a traced XLA:CPU step spends its time: a jax.profiler trace + the step's optimized HLO.

    python tools/profile_train.py 135m --trace /tmp/t     # writes /tmp/t/0/{hlo.txt,plugins/...}
    python tools/profile_trace.py /tmp/t/0 [--top 30]

XLA:CPU records one trace event per executed HLO instruction (thunk); `hlo.txt` maps an instruction
to its kind, shape, FLOPs (the dots in its fused computation) and source line. Several instructions
run at once on the intra-op thread pool, so each instant of the step is shared equally among the
instructions running then ("wall share"): the shares add up to the time the step was busy.

Caveat: dots that XLA:CPU hands to Eigen instead of YNNPACK (`dot` instructions, e.g. a weight
gradient x.T @ dy whose left operand is transposed) run asynchronously: their event covers only
the launch, and their time shows up as other instructions' wall share.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
from math import prod

_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


def read_hlo(path: str) -> tuple[dict, dict]:
    """(instruction -> {kind, shape, calls, src}, computation -> {params, dots}) from optimized HLO text."""
    lines = open(path).read().splitlines()
    tables = {s: {} for s in _SECTIONS}
    section = None
    for line in lines:
        if line in _SECTIONS:
            section = line
            continue
        if section and not line.strip():
            section = None
        elif section:
            key, rest = line.split(" ", 1)
            tables[section][int(key)] = (rest.strip('"') if section in _SECTIONS[:2]
                                         else {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", rest)})

    def source(frame: int | None) -> str:
        out, seen = [], set()
        while frame in tables["StackFrames"] and frame not in seen and len(out) < 2:
            seen.add(frame)
            loc = tables["FileLocations"][tables["StackFrames"][frame]["file_location_id"]]
            name = os.path.basename(tables["FileNames"][loc["file_name_id"]])
            if name not in ("step.py", "objectives.py", "profile_train.py", "api.py"):
                out.append(f"{name}:{loc['line']}")
            frame = tables["StackFrames"][frame]["parent_frame_id"]
        return " < ".join(out)

    instructions, computations, current = {}, {}, None
    for line in lines:
        m = re.match(r"^%?([\w.\-]+) \((.*)\) -> .* \{$", line)
        if m:
            current = m.group(1)
            computations[current] = {"params": dict(re.findall(r"([\w.\-]+): (\w+\[[\d,]*\])", m.group(2))),
                                     "dots": []}
            continue
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = (\w+\[[\d,]*\])\S* ([a-z][\w\-]*)\((.*)", line)
        if not m:
            continue
        name, shape, opcode, rest = m.groups()
        kind = re.search(r"kind=k(\w+)", line)
        calls = re.search(r"calls=%?([\w.\-]+)", line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        instructions[name] = {"kind": opcode + (":" + kind.group(1) if kind else ""), "shape": shape,
                              "calls": calls.group(1) if calls else None,
                              "src": source(int(frame.group(1))) if frame else ""}
        if opcode == "dot":
            operands = re.findall(r"%([\w.\-]+)", rest.split(")")[0])
            contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)
            dot = (shape, operands[0] if operands else None,
                   [int(x) for x in contracting.group(1).split(",") if x] if contracting else [])
            instructions[name]["dot"] = dot
            if current:
                computations[current]["dots"].append(dot)
    return instructions, computations


def _dims(shape: str) -> list[int]:
    return [int(x) for x in re.search(r"\[([\d,]*)\]", shape).group(1).split(",") if x]


def flops(name: str, instructions: dict, computations: dict) -> int:
    """2 * output elements * contracted size: of a dot instruction, or of the dots of the instruction's
    fused computation."""
    inst = instructions.get(name)
    comp = computations.get(inst["calls"]) if inst and inst["calls"] else None
    dots = [inst["dot"]] if inst and "dot" in inst else (comp or {}).get("dots", [])
    total = 0
    for shape, lhs, contracting in dots:
        lhs_shape = (comp or {}).get("params", {}).get(lhs) or instructions.get(lhs, {}).get("shape")
        if lhs_shape:
            total += 2 * prod(_dims(shape)) * prod(_dims(lhs_shape)[k] for k in contracting)
    return total


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dir", help="a directory holding hlo.txt and the trace (plugins/profile/*/*.trace.json.gz)")
    p.add_argument("--top", type=int, default=30)
    args = p.parse_args(argv)
    instructions, computations = read_hlo(os.path.join(args.dir, "hlo.txt"))
    trace = sorted(glob.glob(os.path.join(args.dir, "plugins/profile/*/*.trace.json.gz")))[-1]
    events = [e for e in json.load(gzip.open(trace))["traceEvents"]
              if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    module = collections.Counter(e["args"].get("hlo_module") for e in events).most_common(1)[0][0]
    events = [e for e in events if e["args"].get("hlo_module") == module]
    # Wall share: sweep the events' start and end points, splitting each interval among those running.
    points = sorted([(e["ts"], 1, i) for i, e in enumerate(events)] +
                    [(e["ts"] + e["dur"], -1, i) for i, e in enumerate(events)])
    share, running, last = collections.defaultdict(float), set(), None
    for t, kind, i in points:
        if last is not None and running:
            for j in running:
                share[j] += (t - last) / len(running)
        (running.add if kind == 1 else running.discard)(i)
        last = t
    by_shape = collections.defaultdict(lambda: [0.0, 0, 0])
    by_source = collections.defaultdict(float)
    for i, e in enumerate(events):
        name = e["args"]["hlo_op"]
        inst = instructions.get(name, {"kind": "?", "shape": "?", "src": "?"})
        kind = "ynn" if inst["kind"] == "fusion:Custom" else inst["kind"]  # YNNPACK: dots (+ fused ops)
        row = by_shape[(kind, inst["shape"])]
        row[0] += share[i]
        row[1] += 1
        row[2] += flops(name, instructions, computations)
        by_source[(kind, inst["src"])] += share[i]
    busy = sum(share.values())
    print(f"module {module}: {len(events)} instructions, busy {busy / 1e6:.2f} s")
    print("--- by kind and source line (ms of wall share)")
    for (kind, src), ms in sorted(by_source.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{ms / 1e3:9.1f}  {kind:14s} {src}")
    print("--- by kind and output shape: ms, instructions, GFLOP/s over the wall share")
    for (kind, shape), (us, n, fl) in sorted(by_shape.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"{us / 1e3:9.1f}  x{n:<5d} {fl / us / 1e3 if fl and us else 0:7.1f}  {kind:14s} {shape}")
    ynn = sum(v[0] for k, v in by_shape.items() if k[0] == "ynn")
    total_flops = sum(v[2] for k, v in by_shape.items() if k[0] == "ynn")
    print(f"YNNPACK fusions: {ynn / 1e6:.2f} s ({total_flops / 1e9:.0f} GFLOP of dots, "
          f"{total_flops / max(ynn, 1) / 1e3:.1f} GFLOP/s); everything else {(busy - ynn) / 1e6:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
