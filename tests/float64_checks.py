"""An op in float32 against its reference in float64: every output and every gradient."""

import jax
import jax.numpy as jnp
import numpy as np


def relerr(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_against_float64(fn, ref, args, names, *, fwd_tol=1e-5, grad_tol=1e-4, seed=1):
    """fn(*args) run in float32 and ref(*args) in float64, each returning a tuple of arrays.

    Asserts that every output is within `fwd_tol` and the gradient of sum_i <out_i, w_i> (fixed
    random w_i) w.r.t. every argument within `grad_tol` of the reference (relative L2 errors,
    reported by `names`). Returns fn's outputs.
    """
    assert not jax.config.jax_enable_x64, "the op under test must run without x64, as its callers run it"
    f32 = [jnp.asarray(x, jnp.float32) for x in args]
    out = fn(*f32)
    assert all(o.dtype == jnp.float32 for o in out), [o.dtype for o in out]
    rng = np.random.default_rng(seed)
    weights = [rng.normal(size=o.shape) for o in out]

    def loss(op, dtype):
        return lambda *xs: sum(jnp.sum(o * jnp.asarray(w, dtype)) for o, w in zip(op(*xs), weights))

    got = jax.grad(loss(fn, jnp.float32), argnums=tuple(range(len(args))))(*f32)
    with jax.enable_x64(True):  # the reference only: fn runs as its callers run it
        f64 = [jnp.asarray(np.asarray(x, np.float64)) for x in args]
        want_out = ref(*f64)
        want = jax.grad(loss(ref, jnp.float64), argnums=tuple(range(len(args))))(*f64)
    errs = {f"out{i}": relerr(a, b) for i, (a, b) in enumerate(zip(out, want_out))}
    assert all(e <= fwd_tol for e in errs.values()), errs
    errs = {n: relerr(a, b) for n, a, b in zip(names, got, want)}
    assert all(e <= grad_tol for e in errs.values()), errs
    return out
