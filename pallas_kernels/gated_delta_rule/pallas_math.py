"""Per-chunk maths of the gated delta rule, shared by the TPU and GPU kernels.

One chunk of C tokens, one block of value columns (the recurrence acts on the key dimension, so
value columns evolve independently and a value block is exact on its own). Inside the chunk,
with g_r the cumulative log decay from the chunk start (g_r <= 0, decreasing), Gamma_r = exp(g_r):

    A     = strict_lower(diag(beta) (K K^T) * exp(g_r - g_s))          [C, C]
    T     = (I + A)^-1                                                   (UT transform)
    W     = T diag(beta Gamma) K,   U = T diag(beta) V - W S_0           (WY form: U are the
                                                                          corrected values)
    O     = scale (diag(Gamma) Q S_0 + (Q K^T * exp(g_r - g_s))_{s<=r} U)
    S_C   = Gamma_C S_0 + (K * exp(g_C - g))^T U

which is the recurrence S_t = alpha_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T unrolled
over the chunk (u_t = beta_t (v_t - alpha_t S_{t-1}^T k_t), S_t = alpha_t S_{t-1} + k_t u_t^T).
Every exponent is a difference g_r - g_s with s <= r, or g_r itself: never positive, so no exp
overflows however strong the decay.

Arrays: q, k [C, K]; v, o [C, BV]; gate rows g, beta [1, C] (chunk-local cumulative g); states
[K, BV] float32. Matmul operands are cast to `dtype` (the inputs' dtype) and accumulate in float32.
"""

import jax.numpy as jnp

from pallas_kernels.pallas_common import dot, iota2, last_of_row, row_to_col, unit_lower_inverse

F32 = jnp.float32


def _intra(q, k, g_row, b_row, dtype):
    """The chunk quantities that do not depend on the state."""
    C = k.shape[0]
    g_col, b_col = row_to_col(g_row), row_to_col(b_row)
    r, c = iota2(C)
    incl, strict = r >= c, r > c
    decay = jnp.where(incl, jnp.exp(jnp.where(incl, g_col - g_row, 0.0)), 0.0)  # exp(g_r - g_s)
    kk = dot(k, k, trans_b=True, operand_dtype=dtype)
    a = jnp.where(strict, b_col * kk * decay, 0.0)
    t = unit_lower_inverse(a)
    qk = dot(q, k, trans_b=True, operand_dtype=dtype)
    return g_col, b_col, strict, decay, kk, a, t, qk


def chunk_forward(q, k, v, g_row, b_row, s0, *, scale, dtype):
    """-> (o [C, BV] float32, S_C [K, BV] float32)."""
    g_col, b_col, _, decay, _, _, t, qk = _intra(q, k, g_row, b_row, dtype)
    qf, kf, vf = q.astype(F32), k.astype(F32), v.astype(F32)
    gamma = jnp.exp(g_col)
    w = dot(t, b_col * gamma * kf, operand_dtype=dtype)
    u = dot(t, b_col * vf, operand_dtype=dtype) - dot(w, s0, operand_dtype=dtype)
    p = qk * decay * scale
    o = dot(gamma * qf * scale, s0, operand_dtype=dtype) + dot(p, u, operand_dtype=dtype)
    g_last = last_of_row(g_row)
    kd = kf * jnp.exp(g_last - g_col)
    s1 = jnp.exp(g_last) * s0 + dot(kd, u, trans_a=True, operand_dtype=dtype)
    return o, s1


def chunk_backward(q, k, v, g_row, b_row, s0, do, ds1, *, scale, dtype):
    """Gradients of one chunk given dO [C, BV] and dS_C [K, BV].

    Returns (dq, dk [C, K], dv [C, BV], dg_cum [C, 1], dbeta [C, 1], dS_0 [K, BV]); dg_cum is the
    gradient w.r.t. the chunk-local cumulative gates (the caller turns it into dg with a reverse
    cumulative sum). dq, dk, dg_cum and dbeta are partial sums over this value block.
    """
    C = k.shape[0]
    g_col, b_col, strict, decay, kk, a, t, qk = _intra(q, k, g_row, b_row, dtype)
    qf, kf, vf, dof = q.astype(F32), k.astype(F32), v.astype(F32), do.astype(F32)
    gamma = jnp.exp(g_col)
    kb, vb = b_col * gamma * kf, b_col * vf
    w = dot(t, kb, operand_dtype=dtype)
    u = dot(t, vb, operand_dtype=dtype) - dot(w, s0, operand_dtype=dtype)
    p = qk * decay * scale
    g_last = last_of_row(g_row)
    dec = jnp.exp(g_last - g_col)
    kd = kf * dec

    # Output and state read-out: O = scale diag(Gamma) Q S_0 + P U,  S_C = Gamma_C S_0 + Kd^T U.
    du = dot(p, dof, trans_a=True, operand_dtype=dtype) + dot(kd, ds1, operand_dtype=dtype)
    dp = dot(dof, u, trans_b=True, operand_dtype=dtype)  # only its lower triangle is used
    dqk = dp * decay * scale
    do_s0 = dot(dof, s0, trans_b=True, operand_dtype=dtype)  # dO S_0^T   [C, K]
    dq = scale * gamma * do_s0 + dot(dqk, kf, operand_dtype=dtype)
    dk = dot(dqk, qf, trans_a=True, operand_dtype=dtype)
    ds0 = (dot(gamma * qf * scale, dof, trans_a=True, operand_dtype=dtype)
           + jnp.exp(g_last) * ds1 - dot(w, du, trans_a=True, operand_dtype=dtype))
    dkd = dot(u, ds1, trans_b=True, operand_dtype=dtype)
    dk = dk + dec * dkd

    # WY form: W = T Kb, U = T Vb - W S_0.
    dw = -dot(du, s0, trans_b=True, operand_dtype=dtype)
    dt = dot(dw, kb, trans_b=True, operand_dtype=dtype) + dot(du, vb, trans_b=True, operand_dtype=dtype)
    dkb = dot(t, dw, trans_a=True, operand_dtype=dtype)
    dvb = dot(t, du, trans_a=True, operand_dtype=dtype)
    dv = b_col * dvb
    dk = dk + b_col * gamma * dkb
    kb_rows = jnp.sum(dkb * kf, axis=1, keepdims=True)
    db = jnp.sum(dvb * vf, axis=1, keepdims=True) + gamma * kb_rows
    dg = b_col * gamma * kb_rows

    # T = (I + A)^-1  =>  dA = -T^T dT T^T on the strictly lower part.
    da = jnp.where(strict, -dot(dot(t, dt, trans_a=True), t, trans_b=True), 0.0)
    db = db + jnp.sum(da * kk * decay, axis=1, keepdims=True)
    dkk = da * b_col * decay
    dk = dk + dot(dkk, kf, operand_dtype=dtype) + dot(dkk, kf, trans_a=True, operand_dtype=dtype)

    # Gates: every factor exp(g_r - g_s) gives +x to row r and -x to column s.
    z = da * a + dp * p
    dg = dg + jnp.sum(z, axis=1, keepdims=True) - row_to_col(jnp.sum(z, axis=0, keepdims=True))
    dg = dg + gamma * scale * jnp.sum(dof * dot(qf, s0, operand_dtype=dtype), axis=1, keepdims=True)
    kd_rows = jnp.sum(dkd * kd, axis=1, keepdims=True)
    r = iota2(C, 1)[0]
    last = jnp.sum(kd_rows, axis=0, keepdims=True) + jnp.exp(g_last) * jnp.sum(
        jnp.sum(ds1 * s0, axis=1, keepdims=True), axis=0, keepdims=True)
    dg = dg - kd_rows + jnp.where(r == C - 1, last, 0.0)
    return dq, dk, dv, dg, db, ds0

