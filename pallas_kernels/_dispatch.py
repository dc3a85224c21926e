"""Shared argument checks for the op dispatchers."""

import jax

IMPLS = ("auto", "reference", "chunked", "pallas")


def check_impl(impl: str, op: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"{op}: impl={impl!r} is not one of {IMPLS}")
    return impl


def platform() -> str:
    """The platform of the default backend: 'cpu', 'gpu' or 'tpu'."""
    return jax.default_backend()
