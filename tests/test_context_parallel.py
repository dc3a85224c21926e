"""Context parallelism (kairos_jax/context_parallel.py) on 8 faked CPU devices: the split window
attention (halo exchange by ppermute) and gated delta rule (state hand-off) equal the unsharded
ops, values and gradients, with context = 4 and 2; the whole model's loss and gradients on such
meshes equal the single-device model's. Plus single-process checks of the prefixed window op."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from kairos_jax.parallel import context_parallel
from tests.conftest import count_split_paths

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_worker(part):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0",
               JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, "-m", "tests.context_parallel_worker", part], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])[part]


@pytest.fixture(scope="module")
def op_results():
    return run_worker("ops")


@pytest.mark.parametrize("mesh", ["ctx4", "ctx2"])
@pytest.mark.parametrize("case", ["swa_w3", "dswa_w4_d2", "dswa_w4_d3", "dswa_w4_d3_pallas", "full",
                                  "full_pallas", "gdn", "dswa_w3_d2_uneven", "gdn_uneven"])
def test_context_parallel_op_equals_unsharded(op_results, mesh, case):
    """16 blocks of 4 tokens, mesh (data 1, tensor 2, context 4) or (data 2, tensor 2, context 2):
    at context 4 the DSWA halos (6 and 9 blocks, the latter capped at 12) span 2 and 3 shards."""
    r = op_results[f"{mesh}/{case}"]
    assert r["cp_traced"], r
    assert r["value_err"] < 1e-5 and r["grad_err"] < 1e-5, r
    if case.endswith("_uneven"):
        # 13 blocks / 51 tokens, padded to whole blocks per shard. Such inputs cannot be placed
        # split (jax arrays split evenly only), so they start whole and their outputs and
        # gradients are gathered back: the collectives are not checked here; the model test
        # (7 blocks, slow) covers an uneven split inside a jitted step.
        return
    if case.startswith("gdn"):
        # only the per-shard states (S_loc and M) are gathered, never the sequence
        assert r["fwd_all_gather"] and r["max_all_gather_elems"] == r["state_gather_elems"], r
        assert r["max_all_gather_elems"] < r["sequence_elems"], r
    else:
        # the halo travels by collective-permute and the sequence is never gathered
        assert r["fwd_collective_permute"] and r["grad_collective_permute"], r
        assert not r["fwd_all_gather"] and not r["grad_all_gather"], r


@pytest.mark.slow
def test_context_parallel_model_loss_and_grads_equal_single_device():
    """Tiny model (swa, swa, dswa W=3 d=2, gdn; perturbed parameters so the adaLN-zero gates are
    open) on one device vs context 4 (2 blocks per shard, DSWA halo 4) and context 2, at 8 blocks
    and at 7 (which the mixers pad to 8: an uneven split inside the jitted step)."""
    res = run_worker("model")
    assert sorted(res) == ["ctx2/7blocks", "ctx2/8blocks", "ctx4/7blocks", "ctx4/8blocks"], sorted(res)
    for name in res:
        r = res[name]
        assert r["traced"] == {"window_attention": 3, "gated_delta_rule": 1}, r
        assert r["collective_permute"] and not r["single_traced_cp"], r
        assert r["loss_err"] < 1e-6, r
        assert r["grad_err_total"] < 1e-5 and r["grad_err_max_leaf"] < 2e-5, r


def _sin_loss(fn, *args):
    return jnp.sum(jnp.sin(fn(*args)))


def test_window_attention_prefix_matches_dense_oracle():
    """Banded prefixed op vs the dense masked oracle: queries after P prefix blocks, of which the
    first `first_valid_block` are masked; values and gradients; also a traced first_valid_block."""
    r = np.random.default_rng(0)
    B, H, D, bs = 2, 2, 8, 4
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    for nq, P, W, d, fv in [(6, 4, 3, 2, 1), (7, 9, 4, 3, 4), (4, 3, None, 1, 1)]:
        q = jnp.asarray(r.normal(size=(B, nq * bs, H, D)), jnp.float32)
        k, v = (jnp.asarray(r.normal(size=(B, (nq + P) * bs, H, D)), jnp.float32) for _ in range(2))
        kw = dict(block_size=bs, window=W, dilation=d)
        f = jax.jit(lambda q, k, v, fv, kw=kw: pallas_kernels.window_attention_prefix(
            q, k, v, first_valid_block=fv, impl="chunked", **kw))
        ref = lambda q, k, v, fv, kw=kw: pallas_kernels.window_attention_prefix(
            q, k, v, first_valid_block=fv, impl="reference", **kw)
        assert rel(f(q, k, v, fv), ref(q, k, v, fv)) < 1e-5
        g1 = jax.grad(_sin_loss, (1, 2, 3))(f, q, k, v, fv)
        g2 = jax.grad(_sin_loss, (1, 2, 3))(ref, q, k, v, fv)
        assert max(rel(a, b) for a, b in zip(g1, g2)) < 1e-5


def test_prefix_with_masked_halo_equals_plain_window_attention():
    """A fully masked prefix (what shard 0 sees) leaves plain window attention: zeros there would not."""
    r = np.random.default_rng(1)
    q = jnp.asarray(r.normal(size=(1, 24, 2, 8)), jnp.float32)
    kw = dict(block_size=4, window=3, dilation=2)
    plain = pallas_kernels.window_attention(q, q, q, impl="reference", **kw)
    ext = jnp.concatenate([jnp.zeros((1, 16, 2, 8)), q], axis=1)
    masked = pallas_kernels.window_attention_prefix(q, ext, ext, first_valid_block=4, **kw)
    unmasked = pallas_kernels.window_attention_prefix(q, ext, ext, first_valid_block=0, **kw)
    np.testing.assert_allclose(masked, plain, rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(unmasked - plain))) > 1e-2


def test_halo_blocks_and_fallback_without_context_axis():
    assert context_parallel.halo_blocks(3, 2, 2, 4) == 4      # (W-1) d
    assert context_parallel.halo_blocks(4, 3, 2, 4) == 6      # capped at the blocks before the last shard
    assert context_parallel.halo_blocks(1, 1, 2, 4) == 0
    assert context_parallel.halo_blocks(None, 1, 2, 4) == 6   # full attention: every earlier block
    # no mesh: the plain ops, nothing traced on the split path
    x = jnp.ones((1, 8, 2, 4))
    with count_split_paths() as counts:
        context_parallel.window_attention(x, x, x, block_size=4, window=2, dilation=1, impl="chunked")
    assert not counts
