"""kairos_jax.training.metrics.matmul_flops counts a shard_map body once per device of its manual axes, so
the FLOPs behind MFU and the AOT report do not depend on how the mixers are sharded."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shard_map_body_counts_once_per_device():
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp
        from jax.sharding import AxisType, PartitionSpec as P
        from kairos_jax.training.metrics import matmul_flops
        mesh = jax.make_mesh((2, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
        f = lambda x, w: jnp.tanh(x @ w) @ w.T
        x, w = jnp.ones((8, 16)), jnp.ones((16, 32))
        plain, _ = matmul_flops(jax.make_jaxpr(f)(x, w).jaxpr)
        assert plain == 2 * (2 * 8 * 16 * 32), plain
        both = jax.shard_map(f, mesh=mesh, in_specs=(P(("a", "b")), P()), out_specs=P(("a", "b")))
        one = jax.shard_map(f, mesh=mesh, in_specs=(P("a"), P()), out_specs=P("a"), axis_names={"a"})
        for g in (both, one):
            got, _ = matmul_flops(jax.make_jaxpr(g)(x, w).jaxpr)
            assert got == plain, (got, plain)
        grad = jax.grad(lambda x, w: jnp.sum(both(x, w)), argnums=1)
        got, _ = matmul_flops(jax.make_jaxpr(grad)(x, w).jaxpr)
        want, _ = matmul_flops(jax.make_jaxpr(jax.grad(lambda x, w: jnp.sum(f(x, w)), argnums=1))(x, w).jaxpr)
        assert got == want, (got, want)
        print("ok")
    """)
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
