"""Helpers shared by the ops: argument checks, the compute dtype, the chunked layout, dispatch."""

import contextlib
import threading

import jax
import jax.numpy as jnp

IMPLS = ("auto", "reference", "chunked", "pallas")


def check_impl(impl: str, op: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPLS}")
    return impl


_TARGET = threading.local()


@contextlib.contextmanager
def target_platform(name: str | None):
    """Dispatch as if the program ran on `name` ('cpu', 'gpu' or 'tpu'; None = the default backend).

    For ahead-of-time compilation on another machine: compiling for a TPU topology from a CPU host
    must pick (and lower, not interpret) the TPU kernels that will run there.
    """
    if name not in (None, "cpu", "gpu", "tpu"):
        raise ValueError(f"target platform must be 'cpu', 'gpu', 'tpu' or None, got {name!r}")
    prev = getattr(_TARGET, "name", None)
    _TARGET.name = name
    try:
        yield
    finally:
        _TARGET.name = prev


def platform() -> str:
    """The platform the ops are dispatched for: `target_platform`'s, else the default backend's."""
    return getattr(_TARGET, "name", None) or jax.default_backend()


def use_pallas(impl: str) -> bool:
    """impl='pallas', or impl='auto' on an accelerator (GPU or TPU)."""
    return impl == "pallas" or (impl == "auto" and platform() in ("gpu", "tpu"))


def check_shape(op: str, name: str, x, shape) -> None:
    """Raise a ValueError naming `name` unless x.shape == shape (None entries match anything)."""
    if x.ndim != len(shape) or any(s is not None and s != d for s, d in zip(shape, x.shape)):
        want = "[" + ", ".join("?" if s is None else str(s) for s in shape) + "]"
        raise ValueError(f"{op}: {name} has shape {list(x.shape)}, expected {want}")


def compute_dtype(*xs):
    """float64 when any input (None allowed) is float64, else float32 (bfloat16 inputs included)."""
    return jnp.float64 if any(x is not None and x.dtype == jnp.float64 for x in xs) else jnp.float32


def to_chunks(x, C: int, pad: int):
    """[B, T, H, ...] -> [B, H, N, C, ...], zero-padded with `pad` steps at the end of T."""
    x = jnp.moveaxis(x, 2, 1)
    if pad:
        x = jnp.pad(x, [(0, 0), (0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 3))
    B, H, Tp = x.shape[:3]
    return x.reshape(B, H, Tp // C, C, *x.shape[3:])


def evaluate_with(forward, differentiate):
    """A function that evaluates as `forward` and is differentiated (reverse mode) as `differentiate`.

    Both must compute the same function of the same array arguments. On CPU the per-token scan is
    the fastest forward pass while the chunked form has by far the cheaper gradient; this gives
    each call the faster of the two without knowing whether it will be differentiated.
    """

    @jax.custom_vjp
    def f(*args):
        return forward(*args)

    def f_fwd(*args):
        return jax.vjp(differentiate, *args)  # (outputs, the vjp closure as residual)

    def f_bwd(vjp, cotangents):
        return vjp(cotangents)

    f.defvjp(f_fwd, f_bwd)
    return f
