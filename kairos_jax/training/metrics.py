"""Metrics: TensorBoard event files, a JSON-lines log, a progress bar, and MFU against a
peak measured on this machine (not a datasheet number)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import storage


def measure_peak_flops(dtype: str = "float32", n: int = 1024, reps: int = 8) -> float:
    """Achieved matmul FLOP/s of one device in `dtype` (best of a few timed runs)."""
    x = jnp.ones((n, n), dtype)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def _as_jaxpr(v):
    if hasattr(v, "eqns"):
        return v
    inner = getattr(v, "jaxpr", None)
    return inner if hasattr(inner, "eqns") else None


def _sub_jaxprs(value):
    if isinstance(value, (tuple, list)):
        return [j for v in value for j in _sub_jaxprs(v)]
    j = _as_jaxpr(value)
    return [j] if j is not None else []


def matmul_flops(jaxpr) -> tuple[float, list[str]]:
    """Matmul FLOPs (2 per multiply-add of every dot_general) of a jaxpr, looking into nested
    jaxprs: a scan body counts `length` times, a cond its most expensive branch, a shard_map body
    once per device of its manual axes. Returns the FLOPs
    and the primitives whose repeat count is not static (while loops: body counted once). A
    pallas_call's kernel body is counted once, not once per grid step, so with Pallas mixers the
    count is short by their FLOPs."""
    total, unknown = 0.0, []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "dot_general":
            (lhs_contract, rhs_contract), (_, rhs_batch) = eqn.params["dimension_numbers"]
            lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
            free_rhs = [d for i, d in enumerate(rhs) if i not in rhs_contract and i not in rhs_batch]
            total += 2.0 * math.prod(lhs) * math.prod(free_rhs)
            continue
        inner = [matmul_flops(j) for v in eqn.params.values() for j in _sub_jaxprs(v)]
        if not inner:
            continue
        for _, u in inner:
            unknown.extend(u)
        if name == "scan":
            total += eqn.params["length"] * sum(f for f, _ in inner)
        elif name == "shard_map":
            # the body is one device's program, run by every device of its manual mesh axes
            total += _shard_map_copies(eqn.params) * sum(f for f, _ in inner)
        elif name == "cond":
            total += max(f for f, _ in inner)
        else:
            if name == "while":
                unknown.append(name)
            total += sum(f for f, _ in inner)
    return total, unknown


def _shard_map_copies(params) -> int:
    mesh = params["mesh"]
    axes = next((params[k] for k in ("newly_manual_axes", "manual_axes", "axis_names") if k in params), None)
    axes = mesh.axis_names if axes is None else axes
    return math.prod(dict(zip(mesh.axis_names, mesh.axis_sizes))[a] for a in axes)


def compiled_flops(compiled) -> float | None:
    """FLOPs of one execution of a compiled computation, from XLA's cost analysis (per device).

    XLA counts a loop body once: with scanned layers this is short by the number of repeats, so MFU
    uses `matmul_flops` of the traced step instead; this is reported beside it for comparison."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends do not implement it
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


class MetricWriter:
    """TensorBoard scalars (tensorboardX) + metrics.jsonl, written by process 0 only.

    `logdir` is a local path or a URL (data_pipelines.storage). Locally, metrics.jsonl is appended to
    line by line and the event files are written in logdir/tensorboard/. Objects in a bucket cannot
    be appended to: for a remote logdir both are kept locally (the log in memory, the event files in
    a temporary folder) and uploaded whole through data_pipelines.storage at `flush` (the loop
    flushes at every checkpoint, so the log always reaches the step a resumed run starts from), at
    `close`, and at most every `REMOTE_UPLOAD_S` seconds in between. (tensorboardX's own gs:// writer
    is not used: it uploads once more from a finalizer when the process exits.)
    """

    REMOTE_UPLOAD_S = 60.0

    def __init__(self, logdir: str, *, resume_step: int = 0):
        self.enabled = jax.process_index() == 0
        self.logdir = logdir
        self.jsonl = storage.join(logdir, "metrics.jsonl")
        self.remote = storage.is_remote(logdir)
        self._lines: list[str] = []        # remote: the whole log, uploaded by _upload
        self._uploaded = time.monotonic()
        if not self.enabled:
            return
        from tensorboardX import SummaryWriter

        storage.makedirs(logdir)
        self._truncate_after(resume_step)
        self._events = tempfile.mkdtemp(prefix="kairos-tensorboard-") if self.remote else None
        self.tb = SummaryWriter(logdir=self._events or storage.join(logdir, "tensorboard"))

    def _truncate_after(self, step: int):
        """Drop log lines of steps past the checkpoint a run resumes from (they will be redone)."""
        if not storage.exists(self.jsonl):
            return
        keep = []
        for line in storage.read_bytes(self.jsonl).decode("utf-8", errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= step:
                    keep.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass   # a line cut short (a write that failed, e.g. disk full): its step is redone
        if self.remote:
            self._lines = keep
            storage.write_bytes_atomic(self.jsonl, "".join(keep).encode("utf-8"))
        else:
            with storage.open(self.jsonl, "w") as f:
                f.writelines(keep)

    def _upload(self):
        """Remote: the whole log, and every event file written so far, to logdir."""
        storage.write_bytes_atomic(self.jsonl, "".join(self._lines).encode("utf-8"))
        self.tb.flush()
        for name in storage.walk_files(self._events):
            with open(os.path.join(self._events, name), "rb") as f:
                storage.write_bytes_atomic(storage.join(self.logdir, "tensorboard", name), f.read())
        self._uploaded = time.monotonic()

    def write(self, step: int, scalars: dict):
        if not self.enabled:
            return
        for k, v in scalars.items():
            self.tb.add_scalar(k, v, step)
        line = json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n"
        if self.remote:
            self._lines.append(line)
            if time.monotonic() - self._uploaded >= self.REMOTE_UPLOAD_S:
                self._upload()
        else:
            with storage.open(self.jsonl, "a") as f:
                f.write(line)

    def flush(self):
        if not self.enabled:
            return
        if self.remote:
            self._upload()
        else:
            self.tb.flush()

    def close(self):
        if self.enabled:
            self.tb.close()
            if self.remote:
                self._upload()
                shutil.rmtree(self._events, ignore_errors=True)


def read_metrics(logdir: str) -> list[dict]:
    path = storage.join(logdir, "metrics.jsonl")
    if not storage.exists(path):
        return []
    return [json.loads(line) for line in storage.read_bytes(path).decode("utf-8").splitlines() if line.strip()]


def loss_trend(records: list[dict], key: str = "loss", frac: float = 0.2) -> tuple[float, float] | None:
    """Mean of `key` over the first and the last `frac` of the logged steps."""
    vals = [r[key] for r in records if key in r]
    if len(vals) < 2:
        return None
    n = max(1, int(len(vals) * frac))
    return float(np.mean(vals[:n])), float(np.mean(vals[-n:]))
