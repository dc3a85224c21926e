"""Gated delta rule, chunked: the WY / UT-transform form, all matmuls (the portable XLA fast path).

The recurrence S_t = a_t (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T (a_t = exp(g_t)) is
rewritten with the "new values" u_t = beta_t (v_t - a_t S_{t-1}^T k_t), so that
S_t = a_t S_{t-1} + k_t u_t^T. For a chunk of C tokens starting from the state S, let
b_r = g_1 + ... + g_r (r = 1..C, so b_r <= 0) and D_rs = g_{s+1} + ... + g_r = b_r - b_s. Then

    (I + A) U = diag(beta) V - diag(beta e^b) K S,   A_rs = beta_r e^(D_rs) k_r.k_s  (s < r)
    U = Uc - W S,   [W | Uc] = (I + A)^-1 [diag(beta e^b) K | diag(beta) V]    (the UT transform)
    O = diag(e^b) Q S + (M * Q K^T) U,        M_rs = e^(D_rs)  (s <= r)
    S' = e^(b_C) S + (diag(e^(D_Cs)) K)^T U

Every exponent is a sum of gates, hence <= 0: the chunk start is the reference point and nothing
overflows. D is summed directly over (s, r] (one GEMM with a 0/1 matrix) rather than taken as a
difference of cumulative sums, which would lose its small values to cancellation when earlier
gates are very negative. W, Uc, M * Q K^T and diag(e^b) Q do not depend on the state: they are
computed for all chunks at once as batched matmuls (and recomputed in the backward pass rather
than stored). Only the hand-off U = Uc - W S, S' = e^(b_C) S + ... runs in a scan over chunks,
after which O is again one batched matmul pair over all chunks.
(I + A)^-1 is taken by blocked forward substitution (`unit_lower_inverse`), never by Neumann-series
squaring, which loses all precision when beta ~ 1 and keys are correlated.
"""

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import compute_dtype, to_chunks

_BASE = 16  # blocks of at most this size are inverted row by row


def _inverse_rows(L):
    """(I + L)^-1 for strictly lower L [..., n, n] by forward substitution, one row at a time."""
    n = L.shape[-1]
    eye = jnp.eye(n, dtype=L.dtype)

    def row(r, X):
        # row r of (I + L) X = I: X_r = e_r - sum_{s<r} L_rs X_s (rows >= r of X are still zero)
        L_r = jax.lax.dynamic_index_in_dim(L, r, axis=-2, keepdims=False)
        X_r = jax.lax.dynamic_index_in_dim(eye, r, axis=0, keepdims=False) - jnp.sum(L_r[..., None] * X, -2)
        return jax.lax.dynamic_update_index_in_dim(X, X_r, r, axis=-2)

    return jax.lax.fori_loop(0, n, row, jnp.zeros_like(L))


def _unit_lower_inverse_impl(A):
    n = A.shape[-1]
    if n <= _BASE:
        return _inverse_rows(A)
    h = n // 2
    if n % 2 == 0:  # both halves in one batched call
        X11, X22 = _unit_lower_inverse_impl(jnp.stack([A[..., :h, :h], A[..., h:, h:]]))
    else:
        X11, X22 = _unit_lower_inverse_impl(A[..., :h, :h]), _unit_lower_inverse_impl(A[..., h:, h:])
    # [[I + A11, 0], [A21, I + A22]]^-1 = [[X11, 0], [-X22 A21 X11, X22]]
    X21 = -(X22 @ (A[..., h:, :h] @ X11))
    top = jnp.concatenate([X11, jnp.zeros(X11.shape[:-1] + (n - h,), A.dtype)], axis=-1)
    return jnp.concatenate([top, jnp.concatenate([X21, X22], axis=-1)], axis=-2)


@jax.custom_vjp
def unit_lower_inverse(A):
    """(I + A)^-1 for strictly lower-triangular A [..., C, C], by blocked forward substitution."""
    return _unit_lower_inverse_impl(A)


def _uli_fwd(A):
    X = _unit_lower_inverse_impl(A)
    return X, X


def _uli_bwd(X, G):
    # dX = -X dA X, so the cotangent of A is -X^T G X^T on the strictly lower triangle.
    Xt = jnp.swapaxes(X, -1, -2)
    return (jnp.tril(-(Xt @ G @ Xt), -1),)


unit_lower_inverse.defvjp(_uli_fwd, _uli_bwd)


@jax.checkpoint  # recomputed in the backward pass: less memory, and faster than storing it all
def _intra_chunk(q, k, v, g, beta):
    """Everything that does not depend on the state; inputs [B,H,N,C,*] (q already scaled)."""
    C = q.shape[-2]
    idx = jnp.arange(C)
    incl = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    # D_rs = sum_{s < t <= r} g_t for s <= r: a 0/1 GEMM, so no cancellation between large sums
    D = jnp.einsum("rt,...ts->...rs", incl.astype(g.dtype), jnp.where(strict, g[..., :, None], 0))
    decay = jnp.exp(jnp.where(incl, D, -jnp.inf))
    eb = jnp.exp(jnp.cumsum(g, axis=-1))
    P = decay * jnp.einsum("...rk,...sk->...rs", q, k)
    A = jnp.where(strict, beta[..., None] * decay * jnp.einsum("...rk,...sk->...rs", k, k), 0)
    WU = unit_lower_inverse(A) @ jnp.concatenate([(beta * eb)[..., None] * k, beta[..., None] * v], axis=-1)
    K = k.shape[-1]
    Kd = jnp.exp(D[..., -1, :])[..., None] * k  # e^(b_C - b_s) k_s
    return eb[..., None] * q, P, WU[..., :K], WU[..., K:], Kd, eb[..., -1]


def gated_delta_rule_chunked(q, k, v, g, beta, *, initial_state=None, scale=None, chunk_size=64,
                             output_final_state=True):
    """q, k: [B,T,H,K]; v: [B,T,H,V]; g (log decay <= 0), beta: [B,T,H]; initial_state: [B,H,K,V].

    Returns (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32 (float64 for float64 inputs)
    or None). T need not be a multiple of chunk_size: the tail is padded with g = 0, beta = 0 and
    k = q = v = 0, which leaves the state untouched, and the padded outputs are dropped.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v, g, beta, initial_state)
    scale = K ** -0.5 if scale is None else scale
    C = int(chunk_size)
    if C < 1:
        raise ValueError(f"gated_delta_rule: chunk_size must be >= 1, got {chunk_size}")
    pad = (-T) % C
    out_dtype = v.dtype
    q, k, v, g, beta = (to_chunks(x.astype(dt), C, pad) for x in (q, k, v, g, beta))
    S0 = jnp.zeros((B, H, K, V), dt) if initial_state is None else initial_state.astype(dt)
    Qe, P, W, Uc, Kd, eC = _intra_chunk(q * scale, k, v, g, beta)

    def hand_off(S, xs):
        W_n, Uc_n, Kd_n, eC_n = xs
        U = Uc_n - W_n @ S
        return eC_n[..., None, None] * S + jnp.einsum("...ck,...cv->...kv", Kd_n, U), (S, U)

    S_last, (S_n, U_n) = jax.lax.scan(hand_off, S0, tuple(jnp.moveaxis(x, 2, 0) for x in (W, Uc, Kd, eC)))
    o = Qe @ jnp.moveaxis(S_n, 0, 2) + P @ jnp.moveaxis(U_n, 0, 2)  # [B,H,N,C,V]
    o = o.reshape(B, H, -1, V)[:, :, :T]
    return jnp.moveaxis(o, 1, 2).astype(out_dtype), (S_last if output_final_state else None)
