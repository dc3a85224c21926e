"""Chunked linear recurrences as Pallas kernels: the skeleton shared by the gated delta rule and GLA.

Both ops carry a state S [K, V] through the sequence chunk by chunk; only the per-chunk maths
differ. A `Recurrence` names that maths (`chunk_forward`, `chunk_backward`, written once for both
backends in the op's `pallas_math`) and the kinds of its gate inputs; everything else is here,
once:

- `tpu.py`: Mosaic kernels, grid (B, H, chunks) with the chunk axis 'arbitrary' and the state in
  float32 VMEM scratch; the backward walks the chunks in reverse carrying dS.
- `gpu.py`: Triton kernels, one program per (batch, head, value block) walking the chunks in a
  loop with the state in registers.
- here: padding, the cumulative gates, and the `custom_vjp` whose forward saves each chunk's
  starting state and whose backward runs the reverse chunk pass.

Gate kinds: "row" is one scalar per token ([B, T, H]: GDN's log decay and beta), "key" is one
value per key dimension ([B, T, H, K]: GLA's log decay), tiled like the keys. The first gate is
always the log decay g <= 0: the kernels see its chunk-local cumulative sum (computed by XLA,
since Mosaic has no cumsum), and its gradient is mapped back by the reverse cumulative sum.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.chunk_recurrence import gpu, tpu
from pallas_kernels.pallas_common import (
    chunk_cumsum,
    chunk_reverse_cumsum,
    pad_axis,
    resolve_backend,
    round_up,
)

GATE_KINDS = ("row", "key")
_KERNELS = {"tpu": tpu, "gpu": gpu}


@dataclasses.dataclass(frozen=True)
class Recurrence:
    """One op's per-chunk maths and gate kinds.

    chunk_forward(q, k, v, *gates, s0, *, scale, dtype) -> (o [C, BV], s1 [K, BV] f32);
    chunk_backward(q, k, v, *gates, s0, do, ds1, *, scale, dtype) -> (dq, dk, dv, *dgates, ds0),
    with q, k [C, K], v [C, BV], a "row" gate as a [1, C] row (its gradient a [C, 1] column) and a
    "key" gate as [C, K]. `name` prefixes the kernel names (`{name}_fwd_tpu`, ...).
    """

    name: str
    gates: tuple[str, ...]
    chunk_forward: Callable
    chunk_backward: Callable

    def __post_init__(self):
        if not self.gates or any(kind not in GATE_KINDS for kind in self.gates):
            raise ValueError(f"{self.name}: gate kinds must be a non-empty tuple of {GATE_KINDS}, "
                             f"got {self.gates}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 6, 7, 8, 9))
def _run(rec, q, k, v, gates, h0, scale, chunk_size, backend, interpret):
    g_cum = chunk_cumsum(gates[0], chunk_size)
    o, _, ht = _KERNELS[backend].forward(rec, q, k, v, (g_cum, *gates[1:]), h0, scale=scale,
                                         chunk_size=chunk_size, interpret=interpret, save_states=False)
    return o, ht


def _run_fwd(rec, q, k, v, gates, h0, scale, chunk_size, backend, interpret):
    gates = (chunk_cumsum(gates[0], chunk_size), *gates[1:])
    o, hs, ht = _KERNELS[backend].forward(rec, q, k, v, gates, h0, scale=scale, chunk_size=chunk_size,
                                          interpret=interpret, save_states=True)
    return (o, ht), (q, k, v, gates, hs)


def _run_bwd(rec, scale, chunk_size, backend, interpret, res, cts):
    q, k, v, gates, hs = res
    do, dht = cts
    dq, dk, dv, dgates, dh0 = _KERNELS[backend].backward(
        rec, q, k, v, gates, hs, do, dht, scale=scale, chunk_size=chunk_size, interpret=interpret)
    dgates = (chunk_reverse_cumsum(dgates[0], chunk_size), *dgates[1:])
    return dq, dk, dv, tuple(d.astype(x.dtype) for d, x in zip(dgates, gates)), dh0


_run.defvjp(_run_fwd, _run_bwd)


def apply(rec: Recurrence, q, k, v, gates, *, initial_state=None, scale=None, chunk_size=64,
          output_final_state=True, backend=None, interpret=None):
    """Run `rec` over a whole sequence; the callers check shapes first.

    q, k [B, T, H, K]; v [B, T, H, V]; gates in `rec.gates` order ("row": [B, T, H], "key":
    [B, T, H, K]); initial_state [B, H, K, V] or None (zeros). Returns (o [B, T, H, V] in v.dtype,
    final state [B, H, K, V] float32, or None when output_final_state is False). T need not be a
    multiple of chunk_size: the tail is padded with zeros, which leave the state unchanged for
    both ops (g = 0 keeps it, k = 0 adds nothing). backend / interpret: see
    `pallas_common.resolve_backend`.
    """
    if len(gates) != len(rec.gates):
        raise ValueError(f"{rec.name}: expected {len(rec.gates)} gate inputs, got {len(gates)}")
    backend, interpret = resolve_backend(backend, interpret)
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else float(scale)
    Tp = round_up(T, chunk_size)
    q, k, v = (pad_axis(x, Tp) for x in (q, k, v))
    gates = tuple(pad_axis(x, Tp).astype(jnp.float32) for x in gates)
    h0 = (jnp.zeros((B, H, K, V), jnp.float32) if initial_state is None
          else initial_state.astype(jnp.float32))
    o, ht = _run(rec, q, k, v, gates, h0, scale, chunk_size, backend, interpret)
    return o[:, :T], (ht if output_final_state else None)
