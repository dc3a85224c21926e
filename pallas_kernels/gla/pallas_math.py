"""Per-chunk maths of gated linear attention (per-dimension decay), shared by both backends.

With g_r [K] the chunk-local cumulative log decay (g <= 0, decreasing in r) and Gamma_r = exp(g_r):

    A_rs = scale sum_k q_rk k_sk exp(g_rk - g_sk)   (s <= r)
    O    = scale (Q * Gamma) S_0 + A V
    S_C  = diag(Gamma_C) S_0 + (K * exp(g_C - g))^T V

A is not a plain matmul (the decay depends on k), and exp(g_r) / exp(g_s) separately overflow
under strong decay. So A is built per key sub-chunk j of SUB tokens with the reference point
g_ref = g at the end of sub-chunk j: for a query row r after it, exp(g_r - g_ref) <= 1 and for a key
s inside it exp(g_ref - g_s) <= 1, and A[rows after j, cols in j] = (Q exp(g - g_ref)) (K exp(g_ref -
g))^T is one matmul. The diagonal sub-blocks (r, s in the same sub-chunk) are summed exactly, key
by key. No exponent is ever positive.

Arrays: q, k, g [C, K]; v, o [C, BV]; states [K, BV] float32; sub-chunks of SUB rows are selected
with iota masks (no value slicing), so the code lowers on Mosaic and Triton alike.
"""

import jax.numpy as jnp
from jax import lax

from pallas_kernels.pallas_common import col_to_row, dot, iota2, row_to_col

F32 = jnp.float32
SUB = 16
_SHIFT = SUB.bit_length() - 1


def _row(x, i):
    """Row i of x [C, K] as [1, K] (masked reduction; i may be traced)."""
    r = lax.broadcasted_iota(jnp.int32, x.shape, 0)
    return jnp.sum(jnp.where(r == i, x, 0.0), axis=0, keepdims=True)


def _col(x, j):
    """Column j of x [C, C] as [C, 1]."""
    c = lax.broadcasted_iota(jnp.int32, x.shape, 1)
    return jnp.sum(jnp.where(c == j, x, 0.0), axis=1, keepdims=True)


def _sub_chunks(C):
    r, c = iota2(C)
    return r, c, jnp.right_shift(r, _SHIFT), jnp.right_shift(c, _SHIFT)


def _decayed(q, k, g, j):
    """(Q exp(g - g_ref), K exp(g_ref - g), mask of the [rows after j, cols in j] block)."""
    C = q.shape[0]
    g_ref = _row(g, (j + 1) * SUB - 1)
    qd = q * jnp.exp(jnp.minimum(g - g_ref, 0.0))
    kd = k * jnp.exp(jnp.minimum(g_ref - g, 0.0))
    _, _, rs, cs = _sub_chunks(C)
    return qd, kd, (rs > j) & (cs == j)


def intra_scores(q, k, g, *, scale, dtype):
    """A [C, C]: scale sum_k q_rk k_sk exp(g_rk - g_sk) for s <= r, zero above the diagonal."""
    C = q.shape[0]
    r, c, rs, cs = _sub_chunks(C)
    a = jnp.zeros((C, C), F32)
    for j in range(C // SUB - 1):
        qd, kd, mask = _decayed(q, k, g, j)
        a = a + jnp.where(mask, dot(qd, kd, trans_b=True, operand_dtype=dtype), 0.0)
    diag = (rs == cs) & (r >= c)

    def key(s, a):
        k_s, g_s = _row(k, s), _row(g, s)
        col = jnp.sum(q * k_s * jnp.exp(jnp.minimum(g - g_s, 0.0)), axis=1, keepdims=True)
        return a + jnp.where(diag & (c == s), col, 0.0)

    return lax.fori_loop(0, C, key, a) * scale


def intra_grads(q, k, g, da, *, dtype):
    """(dQ, dK) [C, K] of A (unscaled) given dA [C, C] (lower triangle used)."""
    C = q.shape[0]
    r, c, rs, cs = _sub_chunks(C)
    dq = jnp.zeros(q.shape, F32)
    dk = jnp.zeros(k.shape, F32)
    for j in range(C // SUB - 1):
        qd, kd, mask = _decayed(q, k, g, j)
        da_j = jnp.where(mask, da, 0.0)
        dq = dq + jnp.exp(jnp.minimum(g - _row(g, (j + 1) * SUB - 1), 0.0)) * dot(
            da_j, kd, operand_dtype=dtype)
        dk = dk + jnp.exp(jnp.minimum(_row(g, (j + 1) * SUB - 1) - g, 0.0)) * dot(
            da_j, qd, trans_a=True, operand_dtype=dtype)
    da_diag = jnp.where((rs == cs) & (r >= c), da, 0.0)
    rows = lax.broadcasted_iota(jnp.int32, k.shape, 0)

    def key(s, carry):
        dq, dk = carry
        k_s, g_s = _row(k, s), _row(g, s)
        e = jnp.exp(jnp.minimum(g - g_s, 0.0))  # exp(g_r - g_s) for the rows r >= s that use it
        da_s = _col(da_diag, s)
        dq = dq + da_s * k_s * e
        dk = dk + jnp.where(rows == s, jnp.sum(da_s * q * e, axis=0, keepdims=True), 0.0)
        return dq, dk

    return lax.fori_loop(0, C, key, (dq, dk))


def chunk_forward(q, k, v, g, s0, *, scale, dtype):
    """-> (o [C, BV] float32, S_C [K, BV] float32)."""
    qf, kf, vf, g = q.astype(F32), k.astype(F32), v.astype(F32), g.astype(F32)
    a = intra_scores(qf, kf, g, scale=scale, dtype=dtype)
    o = dot(qf * jnp.exp(g) * scale, s0, operand_dtype=dtype) + dot(a, vf, operand_dtype=dtype)
    g_last = _row(g, q.shape[0] - 1)
    kd = kf * jnp.exp(g_last - g)
    s1 = row_to_col(jnp.exp(g_last)) * s0 + dot(kd, vf, trans_a=True, operand_dtype=dtype)
    return o, s1


def chunk_backward(q, k, v, g, s0, do, ds1, *, scale, dtype):
    """Gradients of one chunk given dO [C, BV] and dS_C [K, BV].

    Returns (dq, dk [C, K], dv [C, BV], dg_cum [C, K], dS_0 [K, BV]); dg_cum is w.r.t. the
    chunk-local cumulative gates. dq, dk and dg_cum are partial sums over this value block.
    """
    C = q.shape[0]
    qf, kf, vf, g, dof = q.astype(F32), k.astype(F32), v.astype(F32), g.astype(F32), do.astype(F32)
    gamma = jnp.exp(g)
    a = intra_scores(qf, kf, g, scale=scale, dtype=dtype)
    g_last = _row(g, C - 1)
    kd = kf * jnp.exp(g_last - g)

    r, c = iota2(C)
    da = jnp.where(r >= c, dot(dof, vf, trans_b=True, operand_dtype=dtype), 0.0) * scale
    dv = dot(a, dof, trans_a=True, operand_dtype=dtype) + dot(kd, ds1, operand_dtype=dtype)
    dq_intra, dk_intra = intra_grads(qf, kf, g, da, dtype=dtype)
    dq = scale * gamma * dot(dof, s0, trans_b=True, operand_dtype=dtype) + dq_intra
    dk_inter = jnp.exp(g_last - g) * dot(vf, ds1, trans_b=True, operand_dtype=dtype)
    dk = dk_intra + dk_inter
    ds0 = (dot(qf * gamma * scale, dof, trans_a=True, operand_dtype=dtype)
           + row_to_col(jnp.exp(g_last)) * ds1)
    # Every factor exp(g_r - g_s) gives +q dq to its query row and -k dk to its key row; the last
    # row also carries the chunk's total decay, which multiplies S_0 and every key's carry-out.
    last = (jnp.exp(g_last) * col_to_row(jnp.sum(ds1 * s0, axis=1, keepdims=True))
            + jnp.sum(kf * dk_inter, axis=0, keepdims=True))
    rows = lax.broadcasted_iota(jnp.int32, q.shape, 0)
    dg = qf * dq - kf * dk + jnp.where(rows == C - 1, last, 0.0)
    return dq, dk, dv, dg, ds0
