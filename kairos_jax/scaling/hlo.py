"""A reader of XLA's optimized HLO text: what each instruction reads and writes, its matmul FLOPs,
the collectives with their sizes and replica groups, and loop trip counts.

The step-time model (`estimate.py`) walks the scheduled entry computation of a compiled program
(`compiled.as_text()`), so the instruction order is the order the device runs them in. Only what the
model needs is parsed: shapes (bytes), opcodes, operands, called computations, `known_trip_count` of
while loops, `replica_groups` (explicit lists and the iota form `[G,S]<=[dims]T(perm)`),
`source_target_pairs`, dot / convolution dimension numbers and cuBLAS GEMM configs.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re

import numpy as np

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "s32": 4,
    "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3b11fnuz": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 0.5, "token": 0,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "collective-permute", "all-to-all",
               "ragged-all-to-all", "collective-broadcast")


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """Every array in a (possibly tuple) shape string: [(dtype, dims)]."""
    return [(t, tuple(int(d) for d in dims.split(",") if d)) for t, dims in _ARRAY.findall(shape)
            if t in DTYPE_BYTES]


def shape_bytes(shape: str) -> float:
    return sum(DTYPE_BYTES[t] * math.prod(d) for t, d in arrays(shape))


@dataclasses.dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    attrs: str
    root: bool = False

    @property
    def bytes(self) -> float:
        return shape_bytes(self.shape)

    def attr(self, key: str) -> str | None:
        """The value of `key=...` (balanced braces / brackets kept whole)."""
        m = re.search(r"(?:^|[\s,])" + re.escape(key) + r"=", self.attrs)
        if not m:
            return None
        i, depth, out = m.end(), 0, []
        s = self.attrs
        while i < len(s):
            ch = s[i]
            if ch in "{[(":
                depth += 1
            elif ch in "}])":
                depth -= 1
                if depth < 0:
                    break
            elif ch == "," and depth == 0:
                break
            out.append(ch)
            i += 1
        return "".join(out).strip()

    def called(self) -> list[str]:
        names = []
        for key in ("calls", "body", "condition", "to_apply", "true_computation", "false_computation",
                    "branch_computations"):
            v = self.attr(key)
            if v:
                names += [n.strip().lstrip("%") for n in v.strip("{}").split(",") if n.strip()]
        return names

    def backend_config(self) -> dict:
        v = self.attr("backend_config")
        if not v:
            return {}
        try:
            return json.loads(v)
        except ValueError:
            return {}


@dataclasses.dataclass
class Computation:
    name: str
    instrs: list[Instr]
    entry: bool = False

    def __post_init__(self):
        self.by_name = {i.name: i for i in self.instrs}

    @property
    def root(self) -> Instr:
        return next((i for i in self.instrs if i.root), self.instrs[-1])


def _split_top(s: str, sep: str = ",") -> list[str]:
    out, depth, cur = [], 0, []
    for ch in s:
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
        if ch == sep and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        out.append("".join(cur))
    return [x.strip() for x in out if x.strip()]


def _balanced(s: str, i: int) -> int:
    """Index just past the bracket group opening at s[i]."""
    depth = 0
    for j in range(i, len(s)):
        if s[j] in "{[(":
            depth += 1
        elif s[j] in "}])":
            depth -= 1
            if depth == 0:
                return j + 1
    return len(s)


_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*\))?\s*->.*\{\s*$")
_DEF = re.compile(r"^(ROOT\s+)?%?([\w.\-]+)\s*=\s*")


def _parse_instr(line: str) -> Instr | None:
    m = _DEF.match(line)
    if not m:
        return None
    rest = line[m.end():]
    if rest.startswith("("):
        j = _balanced(rest, 0)
        shape, rest = rest[:j], rest[j:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
        # a layout may follow the dims without a space: f32[8]{0}
    op = re.match(r"([\w\-]+)\(", rest)
    if not op:
        return None
    j = _balanced(rest, op.end() - 1)
    operand_text, attrs = rest[op.end():j - 1], rest[j:].lstrip(", ")
    operands = []
    for o in _split_top(operand_text):
        name = o.split()[-1] if o.split() else o
        operands.append(name.lstrip("%"))
    return Instr(m.group(2), shape, op.group(1), operands, attrs, root=bool(m.group(1)))


def parse_module(text: str) -> dict[str, Computation]:
    """Computations of an HLO module text by name; the entry one has .entry = True."""
    comps, cur, name, entry = {}, None, None, False
    for raw in text.splitlines():
        line = raw.strip()
        if cur is None:
            h = _HEADER.match(line)
            if h and not line.startswith("HloModule"):
                cur, name, entry = [], h.group(2), bool(h.group(1))
            continue
        if line == "}":
            comps[name] = Computation(name, cur, entry)
            cur = None
            continue
        ins = _parse_instr(line)
        if ins is not None:
            cur.append(ins)
    return comps


def entry(comps: dict[str, Computation]) -> Computation:
    return next(c for c in comps.values() if c.entry)


# Replica groups ----------------------------------------------------------------------------------

def replica_groups(ins: Instr, num_devices: int) -> list[list[int]]:
    """The device groups of a collective (partition ids; one group of all devices when empty)."""
    pairs = ins.attr("source_target_pairs")
    if pairs is not None:
        return [[int(x) for x in p.strip("{}").split(",")] for p in _split_top(pairs.strip()[1:-1])]
    v = ins.attr("replica_groups")
    if v is None or v in ("{}", "{{}}"):
        return [list(range(num_devices))]
    if v.startswith("mesh["):  # mesh form: mesh['a'=2,'b'=4] {'b'} = groups along the named axes
        axes = re.findall(r"'([^']+)'\s*=\s*(\d+)", v[:v.index("]") + 1])
        names, sizes = [a for a, _ in axes], [int(n) for _, n in axes]
        inner = v[v.index("]") + 1:]
        over = re.findall(r"'([^']+)'", inner[inner.index("{"):] if "{" in inner else "")
        ids = np.arange(math.prod(sizes)).reshape(sizes)
        keep = [i for i, n in enumerate(names) if n not in over] + [names.index(n) for n in over]
        size = math.prod(sizes[names.index(n)] for n in over)
        return ids.transpose(keep).reshape(-1, size).tolist()
    if v.startswith("["):  # iota form [G,S]<=[d0,d1,...]T(p0,p1,...)
        m = re.match(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?", v)
        out_shape = [int(x) for x in m.group(1).split(",")]
        dims = [int(x) for x in m.group(2).split(",")]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        return ids.reshape(out_shape[0], -1).tolist()
    return [[int(x) for x in g.strip("{}").split(",") if x.strip()] for g in _split_top(v.strip()[1:-1])]


# FLOPs of matmuls ----------------------------------------------------------------------------------

def _dims_attr(ins: Instr, key: str) -> list[int]:
    v = ins.attr(key)
    return [int(x) for x in v.strip("{}").split(",") if x.strip()] if v else []


def dot_flops(ins: Instr, comp: Computation) -> float:
    """2 x output elements x contracted size, for dot, convolution and cuBLAS GEMM custom calls."""
    out = arrays(ins.shape)
    if not out:
        return 0.0
    if ins.opcode == "dot":
        lhs = comp.by_name.get(ins.operands[0])
        if lhs is None or not arrays(lhs.shape):
            return 0.0
        lhs_dims = arrays(lhs.shape)[0][1]
        k = math.prod(lhs_dims[d] for d in _dims_attr(ins, "lhs_contracting_dims"))
        return 2.0 * math.prod(out[0][1]) * k
    if ins.opcode == "convolution":
        # XLA:TPU writes einsums as convolutions, a free dim sometimes as a kernel "spatial" dim over
        # an input of spatial size 1: a spatial dim contributes min(kernel extent, input extent)
        # multiply-adds per output, not the kernel's extent.
        lhs = comp.by_name.get(ins.operands[0]) if ins.operands else None
        rhs = comp.by_name.get(ins.operands[1]) if len(ins.operands) > 1 else None
        labels = ins.attr("dim_labels")
        if lhs is None or rhs is None or not labels or not arrays(rhs.shape) or not arrays(lhs.shape):
            return 0.0
        lhs_labels, rest = labels.split("_")
        kernel_labels = rest.split("->")[0]
        kdims, xdims = arrays(rhs.shape)[0][1], arrays(lhs.shape)[0][1]
        if len(kdims) != len(kernel_labels) or len(xdims) != len(lhs_labels):
            return 0.0
        per_out = kdims[kernel_labels.index("i")] if "i" in kernel_labels else 1
        for pos, label in enumerate(kernel_labels):
            if label.isdigit():
                x = xdims[lhs_labels.index(label)] if label in lhs_labels else kdims[pos]
                per_out *= min(kdims[pos], x)
        return 2.0 * math.prod(out[0][1]) * per_out
    target = ins.attr("custom_call_target") or ""
    if ins.opcode == "custom-call" and ("gemm" in target or "matmul" in target):
        cfg = ins.backend_config()
        cfg = cfg.get("gemm_backend_config", cfg)
        dn = cfg.get("dot_dimension_numbers", {})
        lhs = comp.by_name.get(ins.operands[0]) if ins.operands else None
        if lhs is None or not arrays(lhs.shape):
            return 0.0
        lhs_dims = arrays(lhs.shape)[0][1]
        k = math.prod(lhs_dims[int(d)] for d in dn.get("lhs_contracting_dimensions", []))
        return 2.0 * math.prod(out[0][1]) * k
    return 0.0


def computation_flops(comps: dict[str, Computation], name: str, _memo=None) -> float:
    """Matmul FLOPs inside a fused (or otherwise called) computation, nested calls included."""
    memo = {} if _memo is None else _memo
    if name in memo:
        return memo[name]
    comp = comps.get(name)
    total = 0.0
    if comp is not None:
        for ins in comp.instrs:
            total += dot_flops(ins, comp)
            if ins.opcode in ("fusion", "call", "async-start"):
                total += sum(computation_flops(comps, c, memo) for c in ins.called())
    memo[name] = total
    return total


# Bytes an instruction moves to and from HBM ------------------------------------------------------

_SLICERS = ("dynamic-slice", "slice", "gather")


def fusion_bytes(ins: Instr, comps: dict[str, Computation], comp: Computation) -> float:
    """Operand + output bytes of a fusion, with in-place and slicing reads counted as XLA runs them:
    a parameter only sliced inside the fusion is read slice by slice; a dynamic-update-slice of a
    parameter into the output writes the update, not the buffer."""
    called = comps.get(ins.called()[0]) if ins.called() else None
    operand_bytes = [comp.by_name[o].bytes if o in comp.by_name else 0.0 for o in ins.operands]
    if called is None:
        return sum(operand_bytes) + ins.bytes
    params = {}
    for i in called.instrs:
        if i.opcode == "parameter":
            m = re.match(r"\s*(\d+)", i.operands[0] if i.operands else "")
            if m:
                params[i.name] = int(m.group(1))
    users: dict[str, list[Instr]] = {}
    for i in called.instrs:
        for o in i.operands:
            users.setdefault(o, []).append(i)
    read = 0.0
    in_place_params = set()
    for pname, idx in params.items():
        full = operand_bytes[idx] if idx < len(operand_bytes) else 0.0
        us = users.get(pname, [])
        if us and all(u.opcode in _SLICERS and u.operands[0] == pname for u in us):
            read += min(full, sum(u.bytes for u in us))
        elif us and all(u.opcode == "dynamic-update-slice" and u.operands[0] == pname for u in us):
            in_place_params.add(pname)
        else:
            read += full
    written = ins.bytes
    if in_place_params:
        # the output buffer aliases the updated parameter: only the updates are written
        dus = [i for i in called.instrs if i.opcode == "dynamic-update-slice" and i.operands[0] in in_place_params]
        upd = sum(called.by_name[d.operands[1]].bytes for d in dus if d.operands[1] in called.by_name)
        written = max(0.0, written - sum(d.bytes for d in dus)) + upd
    return read + written


def instr_bytes(ins: Instr, comps: dict[str, Computation], comp: Computation) -> float:
    if ins.opcode == "fusion":
        return fusion_bytes(ins, comps, comp)
    if ins.opcode in ("dynamic-slice", "slice", "gather"):
        return 2.0 * ins.bytes
    if ins.opcode == "dynamic-update-slice":
        upd = comp.by_name.get(ins.operands[1]) if len(ins.operands) > 1 else None
        return 2.0 * (upd.bytes if upd is not None else 0.0)
    return sum(comp.by_name[o].bytes for o in ins.operands if o in comp.by_name) + ins.bytes


def trip_count(ins: Instr, comps: dict[str, Computation]) -> int | None:
    """A while loop's trip count: XLA's known_trip_count annotation, else a `compare(i, constant)`
    with direction=LT in the condition over an induction variable starting at 0."""
    m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', ins.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get(ins.attr("condition").lstrip("%")) if ins.attr("condition") else None
    if cond is not None:
        for i in cond.instrs:
            if i.opcode == "compare" and "direction=LT" in i.attrs:
                for o in i.operands:
                    c = cond.by_name.get(o)
                    if c is not None and c.opcode == "constant":
                        v = re.match(r"\s*(-?\d+)", c.operands[0] if c.operands else "")
                        if v:
                            return int(v.group(1))
    return None
