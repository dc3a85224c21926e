"""Gated linear attention (per-dimension decay), chunked: matmuls across tokens, scan across chunks.

With b_r = sum of g over the chunk up to and including token r ([C, K], b_r <= 0, decreasing in r),
a chunk starting from state S gives

    o_r = (q_r * e^(b_r))^T S + sum_{s <= r} (sum_k q_rk k_sk e^(b_rk - b_sk)) v_s
    S'  = diag(e^(b_C)) S + (K * e^(b_C - b))^T V

The intra-chunk scores carry a per-dimension decay, so they are not one matmul unless the decay is
split as e^(b_r - ref) e^(ref - b_s) around a reference point ref between s and r; both factors
are then <= 1 and nothing overflows however negative the gates are. We split the chunk into
sub-chunks of _SUB tokens: a query sub-chunk uses the cumulative gate at its own start as ref
for every earlier key (one matmul), and the pairs inside one sub-chunk, where no split point lies
between s and r, are summed exactly over K.
"""

import jax
import jax.numpy as jnp

from pallas_kernels._dispatch import compute_dtype, to_chunks

_SUB = 16


def _intra_chunk_scores(q, k, g):
    """q, k, g: [..., C, K] -> P [..., C, C], P_rs = sum_k q_rk k_sk e^(g_(s+1)k + ... + g_rk), s <= r.

    Exponents are summed inside one sub-chunk, or as whole sub-chunk totals, never as a difference
    of chunk-long cumulative sums, so small exponents keep their precision next to large ones.
    """
    C, K = q.shape[-2:]
    c = _SUB if C % _SUB == 0 else C
    n = C // c
    qs, ks, gs = (x.reshape(*x.shape[:-2], n, c, K) for x in (q, k, g))
    bl = jnp.cumsum(gs, axis=-2)  # gates summed from the start of each sub-chunk
    tri = jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]
    decay = jnp.exp(jnp.where(tri[:, :, None], bl[..., :, None, :] - bl[..., None, :, :], -jnp.inf))
    diag = jnp.sum(qs[..., :, None, :] * ks[..., None, :, :] * decay, axis=-1)  # [..., n, c, c]
    P = jnp.einsum("...irs,ij->...irjs", diag, jnp.eye(n, dtype=q.dtype)).reshape(*q.shape[:-2], C, C)
    if n == 1:
        return P
    # query sub-chunk i >= 1 against the keys s of an earlier sub-chunk j, split at the start of i:
    # e^(bl_r) for the query, e^((gates after s in j) + (totals of sub-chunks j+1..i-1)) for the key
    tot = bl[..., -1, :]  # [..., n, K]
    after = tot[..., :, None, :] - bl  # [..., n, c, K]: gates after s inside its own sub-chunk
    m = jnp.arange(n)
    between = (m[None, None, :] > m[None, :, None]) & (m[None, None, :] < m[1:, None, None])  # j < m < i
    gap = jnp.einsum("ijm,...mk->...ijk", between.astype(g.dtype), tot)  # [..., n-1 (i), n (j), K]
    earlier = m[None, :] < m[1:, None]  # [n-1, n]
    k_exp = jnp.where(earlier[:, :, None, None], gap[..., None, :] + after[..., None, :, :, :], -jnp.inf)
    k_off = (ks[..., None, :, :, :] * jnp.exp(k_exp)).reshape(*q.shape[:-2], n - 1, C, K)
    q_off = qs[..., 1:, :, :] * jnp.exp(bl[..., 1:, :, :])
    off = jnp.einsum("...irk,...isk->...irs", q_off, k_off).reshape(*q.shape[:-2], (n - 1) * c, C)
    return P + jnp.pad(off, [(0, 0)] * (off.ndim - 2) + [(c, 0), (0, 0)])


@jax.checkpoint  # recomputed in the backward pass rather than stored
def _intra_chunk(q, k, v, g):
    """Everything that does not depend on the state; inputs [B,H,N,C,*] (q already scaled)."""
    b = jnp.cumsum(g, axis=-2)  # gates summed from the chunk start
    # gates after s up to the chunk end, summed directly (not as b_C - b_s)
    rest = jnp.flip(jnp.cumsum(jnp.flip(g, -2), axis=-2), -2)
    rest = jnp.concatenate([rest[..., 1:, :], jnp.zeros_like(rest[..., :1, :])], axis=-2)
    Psi = jnp.einsum("...ck,...cv->...kv", k * jnp.exp(rest), v)
    return q * jnp.exp(b), _intra_chunk_scores(q, k, g) @ v, Psi, jnp.exp(b[..., -1, :])


def gla_chunked(q, k, v, g, *, initial_state=None, scale=None, chunk_size=64, output_final_state=True):
    """q, k, g (log decay <= 0): [B,T,H,K]; v: [B,T,H,V]; initial_state: [B,H,K,V].

    Returns (o [B,T,H,V] in v.dtype, final_state [B,H,K,V] float32/64 or None). T need not be a
    multiple of chunk_size: the tail is padded with g = 0 and q = k = v = 0, which leaves the state
    untouched.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    dt = compute_dtype(q, k, v, g, initial_state)
    scale = K ** -0.5 if scale is None else scale
    C = int(chunk_size)
    if C < 1:
        raise ValueError(f"gla: chunk_size must be >= 1, got {chunk_size}")
    pad = (-T) % C
    out_dtype = v.dtype
    q, k, v, g = (to_chunks(x.astype(dt), C, pad) for x in (q, k, v, g))
    S0 = jnp.zeros((B, H, K, V), dt) if initial_state is None else initial_state.astype(dt)

    Qe, PV, Psi, a = _intra_chunk(q * scale, k, v, g)  # a [B,H,N,K]: decay across the chunk

    def hand_off(S, xs):
        a_n, Psi_n = xs
        return a_n[..., None] * S + Psi_n, S

    S_last, S_starts = jax.lax.scan(hand_off, S0, (jnp.moveaxis(a, 2, 0), jnp.moveaxis(Psi, 2, 0)))
    o = Qe @ jnp.moveaxis(S_starts, 0, 2) + PV
    o = o.reshape(B, H, -1, V)[:, :, :T]
    return jnp.moveaxis(o, 1, 2).astype(out_dtype), (S_last if output_final_state else None)
