"""The window attention forward on Pallas Mosaic GPU (`pallas_kernels/window_attention/pallas_mgpu.py`).

On CPU: the kernel runs in Mosaic GPU's interpret mode (TMA copies, barriers, the two shared-memory
slots, the masks and the online softmax as written; the GPU interpreter has no WGMMA rule, so the
two products are computed from the same shared-memory tiles by `dot_general` there) and is checked
against the float64 dense reference and against the Triton kernel, also interpreted. For sm_90:
the op (Mosaic GPU forward + Triton backward) is lowered and compiled by XLA's GPU compiler for an
H100 with the CUDA PJRT plugin (no GPU needed; skipped without jax-cuda12-plugin).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.window_attention import pallas as wp
from pallas_kernels.window_attention import pallas_gpu, pallas_mgpu
from pallas_kernels.window_attention.pallas import window_attention_pallas, window_attention_prefix_pallas
from pallas_kernels.window_attention.reference import window_attention_reference


def relerr(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def bf16_inputs(seed, B, T, H, D, n=3):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.normal(size=(B, T, H, D)), jnp.bfloat16) for _ in range(n))


@pytest.mark.parametrize("T,block_size,window,q0", [(256, 64, 2, 0), (192, 48, 2, 0), (256, 32, 3, 1)])
def test_forward_kernel_equals_triton_kernel_interpreted(T, block_size, window, q0):
    """Both backends' forward kernels on the same phase layout: outputs and log-sum-exp agree
    (tiles of 64; blocks aligned to tiles, straddling them, and a skipped first query tile)."""
    q, k, v = bf16_inputs(T, 1, T, 2, 64)
    blocks = wp._block_ids(1, T, block_size, 1, 0)
    kw = dict(tile=64, block_size=block_size, window=window, scale=64 ** -0.5, interpret=True, q0=q0)
    o_m, lse_m = pallas_mgpu.forward(q, k, v, blocks, **kw)
    o_t, lse_t = pallas_gpu.forward(q, k, v, blocks, **kw)
    assert o_m.shape == o_t.shape == (1, T - q0 * 64, 2, 64) and lse_m.shape == lse_t.shape
    assert relerr(o_m.astype(jnp.float32), o_t.astype(jnp.float32)) <= 1e-3
    np.testing.assert_allclose(np.asarray(lse_m), np.asarray(lse_t), rtol=0, atol=1e-4)


def test_op_forward_and_gradients_against_float64_reference():
    """DSWA(2, 2) over 8 blocks of 32 tokens, backend mosaic_gpu (forward on Mosaic GPU, backward
    on Triton), bf16 inputs: within bf16 rounding of the float64 dense reference."""
    q, k, v, do = bf16_inputs(7, 1, 256, 2, 64, n=4)
    kw = dict(block_size=32, window=2, dilation=2)
    f = lambda q, k, v: window_attention_pallas(q, k, v, tile=64, backend="mosaic_gpu", **kw)
    r = lambda q, k, v: window_attention_reference(q, k, v, **kw)
    x64 = lambda xs: tuple(jnp.asarray(np.asarray(x.astype(jnp.float32), np.float64)) for x in xs)
    o = f(q, k, v)                                   # the kernel in bf16, as the model runs it
    got = jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32) * do.astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)
    with jax.enable_x64(True):                       # only the reference in float64
        ro = r(*x64((q, k, v)))
        do64 = x64((do,))[0]
        want = jax.grad(lambda *a: jnp.sum(r(*a) * do64), argnums=(0, 1, 2))(*x64((q, k, v)))
    # bf16's unit roundoff is u = 2^-8 = 3.9e-3. The forward rounds P (for the P V matmul) and the
    # output to bf16: two roundings, relative error <= 2u + f32 accumulation, so 1e-2 (2.6u) bounds
    # it. The gradients round P, dP and dS = P (dP - D) to bf16 and the difference dP - D cancels
    # (relative error ~2x), so about 4u + 2u: 2e-2 (5u).
    assert relerr(o.astype(jnp.float32), ro) <= 1e-2
    errs = [relerr(a.astype(jnp.float32), b) for a, b in zip(got, want)]
    assert max(errs) <= 2e-2, errs


def test_prefix_form_runs_on_mosaic_gpu():
    """Context parallelism's form (4 own blocks after a 2-block halo whose first block precedes the
    sequence): the skipped padding query tiles (q0 > 0) on the Mosaic GPU forward."""
    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.normal(size=(1, 256, 2, 64)), jnp.bfloat16)
    k, v = (jnp.asarray(rng.normal(size=(1, 384, 2, 64)), jnp.bfloat16) for _ in range(2))
    kw = dict(block_size=64, window=2, first_valid_block=1, tile=64)
    got = window_attention_prefix_pallas(q, k, v, backend="mosaic_gpu", **kw)
    want = window_attention_prefix_pallas(q, k, v, backend="gpu", **kw)
    assert relerr(got.astype(jnp.float32), want.astype(jnp.float32)) <= 1e-3


def test_unsupported_shapes_fall_back_to_triton():
    assert pallas_mgpu.supported(jnp.bfloat16, 128, 128)
    assert not pallas_mgpu.supported(jnp.float32, 128, 128)
    assert not pallas_mgpu.supported(jnp.bfloat16, 32, 128)
    assert not pallas_mgpu.supported(jnp.bfloat16, 128, 32)
    q = jnp.ones((1, 64, 1, 16), jnp.float32)   # f32, D=16, tile 16: runs on the Triton kernels
    o = window_attention_pallas(q, q, q, block_size=16, window=2, tile=16, backend="mosaic_gpu")
    assert o.shape == q.shape and bool(jnp.all(jnp.isfinite(o)))
    with pytest.raises(ValueError, match="mosaic_gpu"):
        pallas_mgpu.forward(q, q, q, jnp.zeros((1, 64)), tile=16, block_size=16, window=2, scale=1.0,
                            interpret=True)


_SM90_SCRIPT = """
import jax, jax.numpy as jnp
from kairos_jax.scaling import aot
from pallas_kernels.window_attention.pallas import window_attention_pallas
device = aot.topology_devices("h100:1x1")[0]
x = jax.ShapeDtypeStruct((1, 512, 2, 128), jnp.bfloat16, sharding=jax.sharding.SingleDeviceSharding(device))
f = lambda q, k, v: window_attention_pallas(q, k, v, block_size=128, window=2, dilation=2, backend="mosaic_gpu",
                                            interpret=False)
loss = lambda q, k, v: jnp.sum(f(q, k, v).astype(jnp.float32))
with jax.set_mesh(jax.sharding.Mesh([device], ("x",))):  # Triton reads the device kind from the mesh
    text = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile().as_text()
print(device.device_kind, text.count('custom_call_target="mosaic_gpu_v2"'),
      "window_attention_dq_gpu" in text, "window_attention_dkv_gpu" in text)
"""


@pytest.mark.gpu_aot
def test_lowers_and_compiles_for_sm90_with_the_cuda_plugin():
    """XLA's GPU compiler (jax-cuda12-plugin, an H100 target description, no GPU) compiles the op's
    forward and backward: one Mosaic GPU custom call (the forward) and the Triton backward kernels.
    In a subprocess with JAX_PLATFORMS=cpu: the plugin registers for compilation only there."""
    pytest.importorskip("jax_plugins.xla_cuda12")
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    out = subprocess.run([sys.executable, "-c", _SM90_SCRIPT], cwd=root, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "NVIDIA H100 80GB HBM3 1 True True", out.stdout
