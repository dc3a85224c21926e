"""The Mosaic TPU kernels lower AND compile for real TPU topologies, without a TPU.

Needs `jax[tpu]` (libtpu), e.g. a venv with `pip install "jax[tpu]==0.12.0.1"`; run with
`python -m pytest -m tpu tests/kernels/test_aot_tpu.py -s` to see the compiled memory analysis.
Compilation runs the Mosaic compiler of libtpu on the kernels, so VMEM overflow, unsupported
layouts or shapes fail here as they would on hardware.
"""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas
from pallas_kernels.gated_delta_rule.pallas_step import gated_delta_rule_step_pallas
from pallas_kernels.gla.pallas import gla_pallas
from pallas_kernels.window_attention.pallas import window_attention_pallas, window_attention_prefix_pallas

pytestmark = pytest.mark.tpu
TOPOLOGIES = ["v5p:2x2x2", "v6e:2x4"]


@pytest.fixture(scope="module", params=TOPOLOGIES)
def device(request):
    pytest.importorskip("libtpu")
    from jax.experimental import topologies

    return request.param, topologies.get_topology_desc(topology_name=request.param, platform="tpu").devices[0]


def compile_and_report(device, label, fn, *shapes):
    topology, dev = device
    sharding = jax.sharding.SingleDeviceSharding(dev)
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]
    compiled = jax.jit(fn).lower(*args).compile()
    mem = compiled.memory_analysis()
    print(f"{topology} {label}: arguments {mem.argument_size_in_bytes / 2**20:.1f} MiB, outputs "
          f"{mem.output_size_in_bytes / 2**20:.1f} MiB, temporaries {mem.temp_size_in_bytes / 2**20:.1f} MiB")
    assert "tpu_custom_call" in compiled.as_text()


def grad_of(fn, n):
    def loss(*xs):
        out = fn(*xs)
        out = out if isinstance(out, tuple) else (out,)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in out if x is not None)
    return jax.grad(loss, argnums=tuple(range(n)))


S = jax.ShapeDtypeStruct
LINEAR = [  # (B, T, H, K=V, dtype)
    (1, 8192, 16, 128, jnp.bfloat16),
    (2, 2048, 4, 128, jnp.float32),
]


@pytest.mark.parametrize("B,T,H,D,dtype", LINEAR)
def test_gated_delta_rule_compiles(device, B, T, H, D, dtype):
    fn = lambda q, k, v, g, b: gated_delta_rule_pallas(q, k, v, g, b, backend="tpu", interpret=False)
    shapes = (S((B, T, H, D), dtype),) * 3 + (S((B, T, H), jnp.float32),) * 2
    label = f"gdn B={B} T={T} H={H} K=V={D} {jnp.dtype(dtype).name}"
    compile_and_report(device, label + " fwd", fn, *shapes)
    compile_and_report(device, label + " fwd+bwd", grad_of(fn, 5), *shapes)


@pytest.mark.parametrize("B,T,H,D,dtype", LINEAR)
def test_gla_compiles(device, B, T, H, D, dtype):
    fn = lambda q, k, v, g: gla_pallas(q, k, v, g, backend="tpu", interpret=False)
    shapes = (S((B, T, H, D), dtype),) * 3 + (S((B, T, H, D), jnp.float32),)
    label = f"gla B={B} T={T} H={H} K=V={D} {jnp.dtype(dtype).name}"
    compile_and_report(device, label + " fwd", fn, *shapes)
    compile_and_report(device, label + " fwd+bwd", grad_of(fn, 4), *shapes)


@pytest.mark.parametrize("B,T,H,D,block,window,dilation,dtype", [
    (1, 8192, 8, 128, 256, 8, 4, jnp.bfloat16),   # DSWA
    (1, 8160, 8, 128, 272, 8, 1, jnp.bfloat16),   # SWA, blocks of 16 action + 256 video tokens
    (2, 2048, 4, 128, 128, None, 1, jnp.float32),  # full block-causal
])
def test_window_attention_compiles(device, B, T, H, D, block, window, dilation, dtype):
    fn = lambda q, k, v: window_attention_pallas(q, k, v, block_size=block, window=window,
                                                 dilation=dilation, backend="tpu", interpret=False)
    shapes = (S((B, T, H, D), dtype),) * 3
    label = (f"window_attention B={B} T={T} H={H} D={D} block={block} window={window} "
             f"dilation={dilation} {jnp.dtype(dtype).name}")
    compile_and_report(device, label + " fwd", fn, *shapes)
    compile_and_report(device, label + " fwd+bwd", grad_of(fn, 3), *shapes)


def test_window_attention_prefix_compiles(device):
    """Context parallelism's form: 12 own blocks of 272 tokens after a 7-block halo (SWA window 8),
    with first_valid_block a traced scalar as each shard computes it from its axis index."""
    block, nq, P = 272, 12, 7
    fn = lambda q, k, v, fv: window_attention_prefix_pallas(
        q, k, v, block_size=block, window=8, dilation=1, first_valid_block=fv, backend="tpu",
        interpret=False)
    shapes = (S((1, nq * block, 8, 128), jnp.bfloat16), *(S((1, (nq + P) * block, 8, 128), jnp.bfloat16),) * 2,
              S((), jnp.int32))
    label = f"window_attention_prefix blocks={nq}+{P} block={block} window=8 bfloat16"
    compile_and_report(device, label + " fwd", fn, *shapes)
    compile_and_report(device, label + " fwd+bwd", grad_of(lambda q, k, v, fv: fn(q, k, v, fv), 3), *shapes)


def test_decode_step_compiles(device):
    fn = lambda q, k, v, g, b, s: gated_delta_rule_step_pallas(q, k, v, g, b, s, backend="tpu",
                                                               interpret=False)
    B, H, D = 8, 16, 128
    compile_and_report(device, f"gdn decode step B={B} H={H} K=V={D}", fn,
                       S((B, H, D), jnp.bfloat16), S((B, H, D), jnp.bfloat16), S((B, H, D), jnp.bfloat16),
                       S((B, H), jnp.float32), S((B, H), jnp.float32), S((B, H, D, D), jnp.float32))
