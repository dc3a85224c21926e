"""A step-time model for targets we cannot run: the compiled train step's optimized HLO replayed
against a chip's published peak figures.

The model (one device's program; SPMD runs the same program on every chip):

1. Every instruction of the scheduled entry computation is visited in schedule order; a while
   loop's body counts `known_trip_count` times (the scan over layers), a fusion is one kernel.
2. A compute instruction (fusion, dot, custom call, copy, ...) takes the roofline time
   max(FLOPs / peak FLOP/s, bytes / HBM bandwidth): FLOPs are the matmuls inside it (dot and
   convolution, cuBLAS GEMMs on GPU), bytes what it reads and writes in HBM (operands + result, with
   slicing reads and in-place dynamic-update-slices counted as XLA runs them; `hlo.fusion_bytes`).
   The Pallas kernels (Mosaic / Triton custom calls) have no FLOPs in the HLO: the FLOPs the
   jaxpr counts beyond the HLO's matmuls are given to them in proportion to their bytes.
3. A collective takes latency + volume / bandwidth with ring-algorithm volumes for a group of n
   chips and result bytes R: all-gather (n-1)/n R, reduce-scatter (n-1) R (the input is n R),
   all-reduce 2 (n-1)/n R, all-to-all (n-1)/n R (x n/4 on a torus ring: the mean distance),
   collective-permute R over one link. Bandwidth: on a TPU torus, the one-way link bandwidth x 2
   (a bidirectional ring, when the group covers a whole axis that wraps around; x 1 on a line) per
   torus axis the group spans (a group over 3 axes drives 3 rings at once); on a GPU node, NVLink's
   one-way bandwidth per GPU, and the inter-node NIC bandwidth per GPU once a group spans hosts.
   Latency: `latency_s + hop_latency_s x ring steps` (assumed, not published: see `Network`).
4. Overlap: one compute stream and one collective stream. A synchronous collective blocks both;
   an async one (`*-start` ... `*-done`) starts when issued and the stream is free, and only the
   time the compute stream waits at its `*-done` is exposed. So
   step = sum of instruction roofline times + exposed collective time,
   i.e. max(compute, HBM) per instruction plus what the schedule fails to hide.

What it leaves out: achieved vs peak FLOP/s inside a kernel (tiles, pipeline bubbles, VPU work on
TPU: non-matmul FLOPs count as bytes only), launch overheads, contention between concurrent
collectives and with HBM traffic, host input. It is an optimistic bound by construction; its error
against a measured step is reported by `measure_host_step` (CPU) and in benchmarks/RESULTS.md.
"""

from __future__ import annotations

import dataclasses
import math
import re

from kairos_jax.scaling import hlo

_SKIP = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all", "partition-id",
         "replica-id", "opt-barrier", "add-dependency", "iota", "domain", "get-dimension-size",
         "copy-done", "send-done", "recv-done", "async-update"}
_KERNEL_TARGETS = ("tpu_custom_call", "__gpu$xla.gpu.triton", "mosaic_gpu", "triton_kernel_call")


@dataclasses.dataclass(frozen=True)
class Network:
    """How a device's collectives travel. kind: 'torus' (TPU ICI), 'switch' (GPU NVLink inside a host,
    NICs between hosts) or 'none' (one device)."""

    kind: str
    link_bandwidth: float = 0.0        # bytes/s one way: per ICI link (torus) / per GPU over NVLink
    inter_host_bandwidth: float = 0.0  # bytes/s one way per GPU between hosts (switch)
    wraps: bool = False                # torus axes that span the slice wrap around
    latency_s: float = 0.0             # per collective (assumed)
    hop_latency_s: float = 0.0         # per ring step (assumed)
    inter_host_hop_latency_s: float = 0.0


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    peak_flops: float        # FLOP/s per device (dense bf16 on accelerators; measured on a host)
    hbm_bandwidth: float     # bytes/s per device
    network: Network
    # per device in partition order (mesh.devices.flat): torus coordinates, or (host, local index)
    coords: tuple = ()
    axis_sizes: tuple = ()


@dataclasses.dataclass
class Collective:
    kind: str
    bytes: float             # result bytes per device
    group_size: int
    groups: int
    count: float             # executions per step (loop trip counts multiplied)
    time_s: float            # one execution
    exposed_s: float = 0.0   # summed over executions
    bandwidth: float = 0.0
    is_async: bool = False
    op_name: str = ""


@dataclasses.dataclass
class Estimate:
    target: str
    step_s: float
    compute_s: float          # sum over instructions of FLOPs / peak
    hbm_s: float              # sum over instructions of bytes / bandwidth
    ops_s: float              # sum over instructions of max(the two)
    collective_s: float       # sum of collective times (as if none overlapped)
    exposed_collective_s: float
    hlo_flops: float          # per device: matmuls in the HLO (loops multiplied)
    kernel_flops: float       # per device: FLOPs given to the Pallas kernels
    hbm_bytes: float          # per device
    collectives: list
    top_ops: list
    unknown_loops: int
    tokens_per_step: int = 0
    model_flops: float = 0.0  # global, remat=none
    step_flops: float = 0.0   # global, as compiled
    chips: int = 1
    peak_flops: float = 0.0

    @property
    def mfu(self) -> float:
        return self.model_flops / (self.chips * self.peak_flops * self.step_s) if self.step_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_per_step / self.step_s if self.step_s else 0.0

    def losses(self) -> dict:
        """Where the step time goes, in seconds per step: model FLOPs at peak, then each loss."""
        ideal = self.model_flops / self.chips / self.peak_flops
        remat = max(0.0, (self.step_flops - self.model_flops) / self.chips / self.peak_flops)
        return {
            "model_flops_at_peak_s": ideal,
            "remat_recompute_s": remat,
            "other_flops_s": self.compute_s - ideal - remat,  # HLO/kernel FLOPs beyond the jaxpr count
            "memory_bound_s": self.ops_s - self.compute_s,    # instructions slower on HBM than on FLOPs
            "exposed_collectives_s": self.exposed_collective_s,
        }

    def dominant_loss(self) -> str:
        losses = {k: v for k, v in self.losses().items() if k != "model_flops_at_peak_s"}
        return max(losses, key=losses.get)

    def collectives_by_kind(self) -> dict:
        out = {}
        for c in self.collectives:
            d = out.setdefault(c.kind, {"count": 0.0, "bytes": 0.0, "time_s": 0.0, "exposed_s": 0.0})
            d["count"] += c.count
            d["bytes"] += c.bytes * c.count
            d["time_s"] += c.time_s * c.count
            d["exposed_s"] += c.exposed_s
        return out

    def summary(self) -> dict:
        return {
            "step_s": self.step_s, "tokens_per_s": self.tokens_per_s, "mfu": self.mfu,
            "compute_s": self.compute_s, "hbm_s": self.hbm_s, "ops_s": self.ops_s,
            "collective_s": self.collective_s, "exposed_collective_s": self.exposed_collective_s,
            "hbm_bytes_per_device": self.hbm_bytes, "hlo_flops_per_device": self.hlo_flops,
            "kernel_flops_per_device": self.kernel_flops, "losses_s": self.losses(),
            "dominant_loss": self.dominant_loss(), "collectives": self.collectives_by_kind(),
            "collective_list": self.collective_list(), "unknown_trip_count_loops": self.unknown_loops,
        }

    def collective_list(self, limit: int = 40) -> list:
        """The collectives with the most time per step: each distinct (kind, result bytes, group size,
        op) with its replica groups' shape, executions per step and time; the rest summed last."""
        ranked = sorted(self.collectives, key=lambda c: -c.time_s * c.count)
        out = [{"kind": c.kind, "bytes": c.bytes, "group_size": c.group_size, "groups": c.groups,
                "count": c.count, "time_s": c.time_s, "total_s": c.time_s * c.count, "exposed_s": c.exposed_s,
                "bandwidth": c.bandwidth, "async": c.is_async, "op_name": c.op_name[-160:]} for c in ranked[:limit]]
        rest = ranked[limit:]
        if rest:
            out.append({"kind": "rest", "distinct": len(rest), "count": sum(c.count for c in rest),
                        "total_s": sum(c.time_s * c.count for c in rest), "exposed_s": sum(c.exposed_s for c in rest)})
        return out

    def format(self) -> str:
        ms = lambda s: f"{s * 1e3:10.2f} ms"
        lines = [
            f"  step-time estimate for {self.target} (kairos_jax/scaling/estimate.py: per-instruction roofline "
            "+ exposed collectives):",
            f"    step            {ms(self.step_s)}   {self.tokens_per_s:,.0f} tokens/s, MFU {self.mfu:.1%}",
            f"    compute         {ms(self.compute_s)}   (HLO matmuls {self.hlo_flops:.4g} + kernels "
            f"{self.kernel_flops:.4g} FLOPs per device at peak)",
            f"    HBM             {ms(self.hbm_s)}   ({self.hbm_bytes / 2 ** 30:.1f} GiB per device)",
            f"    roofline sum    {ms(self.ops_s)}",
            f"    collectives     {ms(self.collective_s)}   of which exposed {ms(self.exposed_collective_s)}",
            "    losses against model FLOPs at peak:",
        ]
        lines += [f"      {k:24s}{ms(v)}" for k, v in self.losses().items()]
        for kind, d in sorted(self.collectives_by_kind().items(), key=lambda kv: -kv[1]["time_s"]):
            lines.append(f"    {kind:20s} x{d['count']:<7.0f} {d['bytes'] / 2 ** 30:8.2f} GiB  {ms(d['time_s'])}"
                         f"  exposed {ms(d['exposed_s'])}")
        return "\n".join(lines)


# Bandwidth of a group ------------------------------------------------------------------------------

def group_bandwidth(group: list[int], target: Target) -> tuple[float, int]:
    """(ring bandwidth in bytes/s one way, ring steps) for one replica group."""
    net = target.network
    if net.kind == "torus":
        pts = [target.coords[d] for d in group]
        bw, steps = 0.0, 0
        for a, size in enumerate(target.axis_sizes):
            extent = len({p[a] for p in pts})
            if extent > 1:
                wrap = net.wraps and extent == size
                bw += net.link_bandwidth * (2 if wrap else 1)
                steps += extent - 1
        return (bw or net.link_bandwidth), max(1, steps)
    if net.kind == "switch":
        hosts = {target.coords[d][0] for d in group}
        if len(hosts) > 1:
            return min(net.link_bandwidth, net.inter_host_bandwidth), len(group) - 1
        return net.link_bandwidth, len(group) - 1
    return float("inf"), 0


def collective_time(kind: str, result_bytes: float, groups: list[list[int]], target: Target) -> tuple[float, float]:
    """(seconds, bandwidth) of one collective; see the module docstring (3.)."""
    net = target.network
    if net.kind == "none" or not groups:
        return 0.0, 0.0
    if kind == "collective-permute":
        # each pair one hop; the slowest pair sets the time
        worst_bw, latency = float("inf"), net.latency_s + net.hop_latency_s
        for pair in groups:
            if len(pair) == 2 and pair[0] != pair[1]:
                bw, _ = group_bandwidth(pair, target)
                bw = bw / (2 if net.kind == "torus" and bw > net.link_bandwidth else 1)  # one direction
                worst_bw = min(worst_bw, bw)
        if worst_bw == float("inf"):
            return 0.0, 0.0
        return latency + result_bytes / worst_bw, worst_bw
    n = len(groups[0])
    if n <= 1:
        return 0.0, 0.0
    bw, steps = min((group_bandwidth(g, target) for g in groups), key=lambda x: x[0])
    if kind == "all-gather":
        volume = (n - 1) / n * result_bytes
    elif kind == "reduce-scatter":
        volume = (n - 1) * result_bytes
    elif kind == "all-reduce":
        volume, steps = 2 * (n - 1) / n * result_bytes, 2 * steps
    elif kind in ("all-to-all", "ragged-all-to-all"):
        volume = (n - 1) / n * result_bytes * (max(1.0, n / 4) if net.kind == "torus" else 1.0)
    else:  # collective-broadcast
        volume = result_bytes
    hop = net.hop_latency_s
    if net.kind == "switch" and len({target.coords[d][0] for d in groups[0]}) > 1:
        hop = net.inter_host_hop_latency_s
    return net.latency_s + hop * steps + volume / bw, bw


# The replay ----------------------------------------------------------------------------------------

def _collective_kind(ins: hlo.Instr, comps) -> tuple[str | None, hlo.Instr, bool]:
    """(kind, the instruction carrying its attributes, is_async) or (None, ...)."""
    op = ins.opcode
    for kind in hlo.COLLECTIVES:
        if op == kind:
            return kind, ins, False
        if op == kind + "-start":
            return kind, ins, True
    if op == "async-start":
        called = comps.get(ins.called()[0]) if ins.called() else None
        if called is not None:
            root = called.root
            for kind in hlo.COLLECTIVES:
                if root.opcode == kind:
                    return kind, root, True
    return None, ins, False


def _op_name(ins: hlo.Instr) -> str:
    m = re.search(r'op_name="([^"]*)"', ins.attrs)
    return m.group(1) if m else ""


class _Replay:
    def __init__(self, comps, target: Target, kernel_flops_per_byte: float = 0.0):
        self.comps, self.t = comps, target
        self.kfpb = kernel_flops_per_byte
        self.compute = self.hbm = self.ops = self.flops = self.bytes = 0.0
        self.kernel_bytes = self.kernel_flops = 0.0
        self.collectives: dict[tuple, Collective] = {}
        self.op_times: dict[str, float] = {}
        self.op_bytes: list[tuple[float, float]] = []   # (bytes, executions) of each compute instruction
        self.unknown = 0
        self.memo_flops: dict = {}

    def run(self, name: str, mult: float) -> float:
        comp = self.comps[name]
        now, comm_free, pending = 0.0, 0.0, {}
        for ins in comp.instrs:
            op = ins.opcode
            if op in _SKIP:
                continue
            if op == "while":
                n = hlo.trip_count(ins, self.comps)
                if n is None:
                    self.unknown += 1
                    n = 1
                body = ins.attr("body").lstrip("%")
                now += n * self.run(body, mult * n)
                continue
            if op == "call":
                now += sum(self.run(c, mult) for c in ins.called())
                continue
            if op == "conditional":
                now += max((self.run(c, mult) for c in ins.called()), default=0.0)
                continue
            kind, carrier, is_async = _collective_kind(ins, self.comps)
            if kind is not None:
                result = ins.bytes
                if is_async:  # the start's shape holds (operands, result, ...): take the done's
                    done = next((i for i in comp.instrs if i.operands and i.operands[0] == ins.name
                                 and i.opcode.endswith("-done")), None)
                    result = done.bytes if done is not None else hlo.shape_bytes(ins.shape) / 2
                groups = hlo.replica_groups(carrier, len(self.t.coords) or 1)
                dur, bw = collective_time(kind, result, groups, self.t)
                key = (kind, result, len(groups[0]) if groups else 0, _op_name(carrier))
                c = self.collectives.get(key)
                if c is None:
                    c = self.collectives[key] = Collective(kind, result, len(groups[0]) if groups else 0, len(groups),
                                                           0.0, dur, bandwidth=bw, is_async=is_async,
                                                           op_name=_op_name(carrier))
                c.count += mult
                start = max(now, comm_free)
                if is_async:
                    comm_free = start + dur
                    pending[ins.name] = (comm_free, c)
                else:
                    c.exposed_s += (start + dur - now) * mult
                    now = comm_free = start + dur
                continue
            if op.endswith("-done") and ins.operands and ins.operands[0] in pending:
                end, c = pending.pop(ins.operands[0])
                if end > now:
                    c.exposed_s += (end - now) * mult
                    now = end
                continue
            if op.endswith("-done") or op.endswith("-start") and op != "copy-start":
                continue
            flops = hlo.dot_flops(ins, comp)
            if op in ("fusion", "async-start"):
                flops += sum(hlo.computation_flops(self.comps, c, self.memo_flops) for c in ins.called())
            nbytes = hlo.instr_bytes(ins, self.comps, comp)
            target = ins.attr("custom_call_target") or ""
            kflops = 0.0
            if op == "custom-call" and any(k in target for k in _KERNEL_TARGETS):
                self.kernel_bytes += nbytes * mult
                kflops = self.kfpb * nbytes
            tc = (flops + kflops) / self.t.peak_flops
            tm = nbytes / self.t.hbm_bandwidth
            t = max(tc, tm)
            self.compute += tc * mult
            self.hbm += tm * mult
            self.ops += t * mult
            self.flops += flops * mult
            self.kernel_flops += kflops * mult
            self.bytes += nbytes * mult
            self.op_bytes.append((nbytes, mult))
            if tm > tc:
                key = _op_name(ins) or ins.name
                self.op_times[key] = self.op_times.get(key, 0.0) + (tm - tc) * mult
            now += t
        for end, c in pending.values():
            if end > now:
                c.exposed_s += (end - now) * mult
                now = end
        return now


def typical_op_bytes(hlo_text: str) -> float:
    """The bytes-weighted median of the HBM bytes one instruction moves: the working-set size at
    which a host's memory bandwidth is measured (`host.measure_bandwidth`), so that a program whose
    buffers sit in a CPU cache is not timed against DRAM bandwidth."""
    comps = hlo.parse_module(hlo_text)
    r = _Replay(comps, host_target(1.0, 1.0))
    r.run(hlo.entry(comps).name, 1.0)
    ops = sorted(r.op_bytes)
    total = sum(b * m for b, m in ops)
    acc = 0.0
    for b, m in ops:
        acc += b * m
        if acc >= total / 2:
            return b
    return ops[-1][0] if ops else 0.0


def estimate(hlo_text: str, target: Target, *, step_flops: float, model_flops: float, chips: int,
             tokens_per_step: int) -> Estimate:
    """The step-time model of a compiled program (`compiled.as_text()`) on `target`.

    step_flops / model_flops: global matmul FLOPs of the step as compiled and with remat=none (the
    jaxpr counts of `aot.step_flops`); the per-device share of step_flops beyond the HLO's own
    matmuls is attributed to the Pallas kernels."""
    comps = hlo.parse_module(hlo_text)
    main = hlo.entry(comps).name
    first = _Replay(comps, target)
    first.run(main, 1.0)
    missing = max(0.0, step_flops / chips - first.flops)
    rate = missing / first.kernel_bytes if first.kernel_bytes else 0.0
    r = _Replay(comps, target, rate)
    step = r.run(main, 1.0)
    colls = sorted(r.collectives.values(), key=lambda c: -c.exposed_s)
    coll_total = sum(c.time_s * c.count for c in colls)
    top = sorted(r.op_times.items(), key=lambda kv: -kv[1])[:10]
    return Estimate(target=target.name, step_s=step, compute_s=r.compute, hbm_s=r.hbm, ops_s=r.ops,
                    collective_s=coll_total, exposed_collective_s=step - r.ops, hlo_flops=r.flops,
                    kernel_flops=r.kernel_flops, hbm_bytes=r.bytes, collectives=colls, top_ops=top,
                    unknown_loops=r.unknown, tokens_per_step=tokens_per_step, model_flops=model_flops,
                    step_flops=step_flops, chips=chips, peak_flops=target.peak_flops)


def target_for(chip, devices, *, name: str, dims: tuple[int, ...]) -> Target:
    """The model's view of a topology: the chip's figures and each device's place in the network,
    in partition order (`devices` = mesh.devices.flat)."""
    if chip.platform == "tpu":
        coords = tuple(tuple(d.coords) for d in devices)
        axis_sizes = tuple(max(c[a] for c in coords) + 1 for a in range(len(coords[0])))
        net = Network("torus", chip.link_bandwidth, wraps=math.prod(dims) >= chip.wrap_chips,
                      latency_s=2e-6, hop_latency_s=1e-6)
        return Target(name, chip.peak_bf16_flops, chip.hbm_bandwidth, net, coords, axis_sizes)
    per_host = dims[1]
    order = sorted(d.id for d in devices)
    coords = tuple((order.index(d.id) // per_host, order.index(d.id) % per_host) for d in devices)
    net = Network("switch", chip.link_bandwidth, chip.inter_host_bandwidth, latency_s=10e-6, hop_latency_s=1e-6,
                  inter_host_hop_latency_s=5e-6)
    return Target(name, chip.peak_bf16_flops, chip.hbm_bandwidth, net, coords, (dims[0], per_host))


def host_target(peak_flops: float, bandwidth: float, name: str = "cpu") -> Target:
    return Target(name, peak_flops, bandwidth, Network("none"), ((0,),), (1,))
