"""The Triton GPU kernels lower for CUDA without a GPU.

`jax.export` for platform "cuda", with an abstract H100 (sm_90) standing in for the device Pallas
asks for its compute capability, lowers every kernel (forward and backward) to Triton IR and
embeds it in the exported StableHLO as a Triton custom call. What this does not do is run Triton's
own compiler (TTIR -> PTX -> SASS): that happens inside XLA's GPU compiler, which needs the CUDA
plugin.
"""

import re
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax import export

from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas
from pallas_kernels.gated_delta_rule.pallas_step import gated_delta_rule_step_pallas
from pallas_kernels.gla.pallas import gla_pallas
from pallas_kernels.window_attention.pallas import window_attention_pallas, window_attention_prefix_pallas

TRITON_CALL = "__gpu$xla.gpu.triton"


def export_for_h100(fn, *shapes):
    mesh = jax.sharding.AbstractMesh((1,), ("x",), abstract_device=jax.sharding.AbstractDevice(
        device_kind="NVIDIA H100", num_cores=132, platform="gpu"))
    with warnings.catch_warnings(), jax.sharding.use_abstract_mesh(mesh):
        warnings.simplefilter("ignore", DeprecationWarning)  # the Pallas Triton backend's notice
        exported = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[
            export.DisabledSafetyCheck.custom_call(TRITON_CALL)])(*shapes)
    module = exported.mlir_module()
    return re.findall(r'custom_call @([^\(]+)\(', module), re.findall(r'name = "([a-z_]+_gpu)"', module)


def grad_of(fn, n):
    def loss(*xs):
        out = fn(*xs)
        out = out if isinstance(out, tuple) else (out,)
        return sum(jnp.sum(x.astype(jnp.float32)) for x in out if x is not None)
    return jax.grad(loss, argnums=tuple(range(n)))


B, T, H, D = 1, 256, 2, 128
bf16 = lambda *s: jax.ShapeDtypeStruct(s, jnp.bfloat16)
f32 = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)


@pytest.mark.parametrize("op", ["gated_delta_rule", "gla", "window_attention", "window_attention_prefix"])
def test_forward_and_backward_lower_to_triton(op):
    if op == "gated_delta_rule":
        fn = lambda q, k, v, g, b: gated_delta_rule_pallas(q, k, v, g, b, backend="gpu", interpret=False)
        shapes = (bf16(B, T, H, D),) * 3 + (f32(B, T, H),) * 2
        names = {"gdn_fwd_gpu", "gdn_bwd_gpu"}
    elif op == "gla":
        fn = lambda q, k, v, g: gla_pallas(q, k, v, g, backend="gpu", interpret=False)
        shapes = (bf16(B, T, H, D),) * 3 + (f32(B, T, H, D),)
        names = {"gla_fwd_gpu", "gla_bwd_gpu"}
    elif op == "window_attention":
        fn = lambda q, k, v: window_attention_pallas(q, k, v, block_size=32, window=2, dilation=2,
                                                     backend="gpu", interpret=False)
        shapes = (bf16(B, T, H, D),) * 3
        names = {"window_attention_fwd_gpu", "window_attention_dq_gpu", "window_attention_dkv_gpu"}
    else:  # context parallelism's form: 3 halo blocks before the 8 own ones, the first 2 masked
        fn = lambda q, k, v: window_attention_prefix_pallas(
            q, k, v, block_size=32, window=2, dilation=2, first_valid_block=2, backend="gpu",
            interpret=False)
        shapes = (bf16(B, T, H, D), bf16(B, T + 96, H, D), bf16(B, T + 96, H, D))
        names = {"window_attention_fwd_gpu", "window_attention_dq_gpu", "window_attention_dkv_gpu"}
    calls, kernels = export_for_h100(grad_of(fn, len(shapes)), *shapes)
    assert set(calls) == {TRITON_CALL} and set(kernels) == names, (calls, kernels)


def test_decode_step_lowers_to_triton():
    fn = lambda q, k, v, g, b, s: gated_delta_rule_step_pallas(q, k, v, g, b, s, backend="gpu",
                                                               interpret=False)
    calls, kernels = export_for_h100(fn, bf16(B, H, D), bf16(B, H, D), bf16(B, H, D), f32(B, H),
                                     f32(B, H), f32(B, H, D, D))
    assert calls == [TRITON_CALL] and kernels == ["gdn_step_gpu"]
