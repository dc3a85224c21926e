"""Helpers shared by the Pallas kernels of every op, on both backends.

Backends: "tpu" (Mosaic TPU: grid over chunks, state in VMEM scratch) and "gpu" (Triton: one program
per (batch, head, value block), state carried in registers by a loop over chunks). On CPU the
kernels run with `interpret=True` (tests only).

The in-kernel helpers below use only what both Mosaic and Triton lower: 2-D arrays, iota masks,
`where`, reductions along one axis, element-wise maths and 2-D `dot_general`. In particular no
cumsum (Mosaic has none: cumulative gates are computed outside the kernels) and no slicing of
values (Triton has none: sub-blocks are read from refs).
"""

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

BACKENDS = ("tpu", "gpu")
# Ops with a Pallas Mosaic GPU kernel accept this backend too (window attention's forward:
# `window_attention/pallas_mgpu.py`); it runs natively on the "gpu" platform.
MOSAIC_GPU = "mosaic_gpu"


def gpu_attention_backend() -> str:
    """The window attention kernels used on a GPU when no backend is named: "gpu" (Triton, the
    default) or, with KAIROS_GPU_ATTENTION=mosaic, "mosaic_gpu" (Mosaic GPU forward, Triton backward).
    Triton stays the default until the Mosaic kernel has been checked and timed on a GPU
    (benchmarks/kernels_gpu.py)."""
    import os

    return MOSAIC_GPU if os.environ.get("KAIROS_GPU_ATTENTION", "").lower() in ("mosaic", "mosaic_gpu") else "gpu"


def tpu_sequential_grid(parallel_axes: int) -> pltpu.CompilerParams:
    """Mosaic params of a grid of `parallel_axes` independent axes followed by one sequential
    ('arbitrary') axis, along which a kernel carries its state in VMEM scratch."""
    return pltpu.CompilerParams(dimension_semantics=("parallel",) * parallel_axes + ("arbitrary",))


def resolve_backend(backend: str | None, interpret: bool | None, allowed=BACKENDS) -> tuple[str, bool]:
    """Which kernels to run and whether to interpret them.

    backend=None follows the dispatch platform (`_dispatch.target_platform`, else
    `jax.default_backend()`): "tpu" -> Mosaic, "gpu" -> Triton, anything else
    (CPU) -> the Mosaic kernels in interpret mode. interpret=None interprets exactly when the
    kernels' backend is not the platform the program runs on; pass interpret=False with an explicit
    backend to lower for another target ahead of time (AOT compilation for a TPU topology, export
    for CUDA).
    """
    from pallas_kernels._dispatch import platform as dispatch_platform

    platform = dispatch_platform()
    if backend is None:
        backend = platform if platform in BACKENDS else "tpu"
    if backend not in allowed:
        raise ValueError(f"pallas backend must be one of {tuple(allowed)} or None, got {backend!r}")
    if interpret is None:
        interpret = platform != ("gpu" if backend == MOSAIC_GPU else backend)
    return backend, bool(interpret)


def dot(a, b, *, trans_a: bool = False, trans_b: bool = False, operand_dtype=None):
    """a @ b (optionally a^T, b^T) with float32 accumulation; 2-D operands only.

    Operands are cast to `operand_dtype` (default: float32). Float32 operands use full precision
    (Precision.HIGHEST: IEEE on Triton, multi-pass on the MXU); bfloat16 operands are exact
    products accumulated in float32.
    """
    operand_dtype = jnp.float32 if operand_dtype is None else operand_dtype
    a = a.astype(operand_dtype)
    b = b.astype(operand_dtype)
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    precision = lax.Precision.HIGHEST if operand_dtype == jnp.float32 else lax.Precision.DEFAULT
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def iota2(n: int, m: int | None = None):
    """(row index, column index) int32 arrays of shape [n, m]."""
    m = n if m is None else m
    return lax.broadcasted_iota(jnp.int32, (n, m), 0), lax.broadcasted_iota(jnp.int32, (n, m), 1)


def row_to_col(x):
    """[1, n] -> [n, 1] through an identity mask (no transpose of a thin array)."""
    n = x.shape[1]
    r, c = iota2(n)
    return jnp.sum(jnp.where(r == c, x, 0.0), axis=1, keepdims=True)


def col_to_row(x):
    """[n, 1] -> [1, n]."""
    n = x.shape[0]
    r, c = iota2(n)
    return jnp.sum(jnp.where(r == c, x, 0.0), axis=0, keepdims=True)


def last_of_row(x):
    """[1, n] -> [1, 1], its last entry."""
    n = x.shape[1]
    c = lax.broadcasted_iota(jnp.int32, (1, n), 1)
    return jnp.sum(jnp.where(c == n - 1, x, 0.0), axis=1, keepdims=True)


def unit_lower_inverse(a):
    """(I + A)^-1 for A [n, n] strictly lower triangular, by forward substitution.

    Column sweep: once row j of X is final, subtract A[i, j] X[j, :] from every later row i. Each
    step is exact arithmetic on the entries it touches, so with ||k|| = 1, beta <= 1 and weak decay
    (entries of A near 1) the result stays as accurate as the matrix allows, unlike Neumann-series
    squaring, whose partial products grow like binomial coefficients before they cancel.
    """
    n = a.shape[0]
    r, c = iota2(n)
    eye = (r == c).astype(jnp.float32)

    def step(j, x):
        a_col = jnp.sum(jnp.where(c == j, a, 0.0), axis=1, keepdims=True)  # A[:, j]    [n, 1]
        x_row = jnp.sum(jnp.where(r == j, x, 0.0), axis=0, keepdims=True)  # X[j, :]    [1, n]
        return x - a_col * x_row

    return lax.fori_loop(0, n - 1, step, eye)


def chunk_cumsum(g, chunk_size: int, axis: int = 1):
    """Cumulative sum of g along `axis`, restarted at every chunk (length a multiple of chunk_size).

    Computed by XLA outside the kernels; each chunk's values are relative to the chunk start, so
    every exp the kernels take is of a difference of two such sums, never of a growing total.
    """
    shape = g.shape
    n = shape[axis]
    split = shape[:axis] + (n // chunk_size, chunk_size) + shape[axis + 1:]
    return jnp.cumsum(g.reshape(split), axis=axis + 1).reshape(shape)


def chunk_reverse_cumsum(x, chunk_size: int, axis: int = 1):
    """sum_{s >= t} x_s inside each chunk: the adjoint of `chunk_cumsum`."""
    return jnp.flip(chunk_cumsum(jnp.flip(x, axis), chunk_size, axis), axis)


def pad_axis(x, length: int, axis: int = 1):
    """Zero-pad `axis` of x at the end to `length`."""
    extra = length - x.shape[axis]
    if extra == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def round_up(n: int, m: int) -> int:
    return -(-n // m) * m


class TpuTokenLayout:
    """How a token-major array [B, T, H, D] is tiled for Mosaic without copying when possible.

    Mosaic DMAs blocks whose last two dims are multiples of (8, 128) or whole. With D a multiple of
    128 the free reshape [B, T, H*D] gives each (batch, head, row block) a [rows, D] tile; otherwise
    the array is transposed once to [B, H, T, D].
    """

    def __init__(self, shape):
        self.B, self.T, self.H, self.D = shape
        self.fused = self.D % 128 == 0

    def to_kernel(self, x):
        B, T, H, D = x.shape
        return x.reshape(B, T, H * D) if self.fused else jnp.transpose(x, (0, 2, 1, 3))

    def from_kernel(self, y):
        if self.fused:
            return y.reshape(y.shape[0], y.shape[1], self.H, self.D)
        return jnp.transpose(y, (0, 2, 1, 3))

    def kernel_shape(self, T):
        return (self.B, T, self.H * self.D) if self.fused else (self.B, self.H, T, self.D)

    def spec(self, rows, index):
        """BlockSpec of [rows, D] tiles; index(*grid_ids) -> (b, h, row_block)."""
        if self.fused:
            def index_map(*ids):
                b, h, t = index(*ids)
                return b, t, h
            return pl.BlockSpec((None, rows, self.D), index_map)

        def index_map(*ids):
            b, h, t = index(*ids)
            return b, h, t, 0
        return pl.BlockSpec((None, None, rows, self.D), index_map)
