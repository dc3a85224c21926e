"""Sharded training on 8 faked CPU devices with the real mesh code: parameters land where the
logical-axis rules say, and the sharded step computes the single-device loss and update."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kairos_jax.parallel.sharding import logical_to_mesh_spec, mesh_shape
from tests.conftest import tiny_config


@pytest.fixture(scope="module")
def sharded_run():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "tests.sharding_worker"], cwd=root, env=env, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_parameters_are_sharded_as_the_rules_say(sharded_run):
    info = sharded_run["sharding"]
    # Hand-derived expectations for the (data=2, fsdp=2, tensor=2) mesh and base.LOGICAL_AXIS_RULES:
    # embed -> fsdp, mlp/heads -> tensor, layers/kv/patch/vocab -> replicated.
    expect = {
        "['video_in']['kernel']": ([None, "fsdp"], lambda s: [s[0], s[1] // 2]),
        "['units']['layers'][0]['mlp'][1]['up']['kernel']": ([None, "fsdp", "tensor"],
                                                            lambda s: [s[0], s[1] // 2, s[2] // 2]),
        "['units']['layers'][0]['mixer']['q'][1]['kernel']": ([None, "fsdp", "tensor", None],
                                                             lambda s: [s[0], s[1] // 2, s[2] // 2, s[3]]),
        "['units']['layers'][3]['mixer']['A_log']": ([None, "tensor"], lambda s: [s[0], s[1] // 2]),
        "['text']['embed']": ([None, "fsdp"], lambda s: [s[0], s[1] // 2]),
    }
    for key, (spec, shard) in expect.items():
        assert key in info, sorted(info)[:20]
        got = info[key]
        assert got["spec"][:len(spec)] == spec and all(s is None for s in got["spec"][len(spec):]), (key, got)
        assert got["shard_shape"] == shard(got["shape"]), (key, got)
    # Every parameter follows the rules table (checked with the mesh's divisibility fallback).
    assert all(v["shard_shape"] != v["shape"] for k, v in info.items() if "mlp" in k and "kernel" in k)


def test_sharded_steps_equal_single_device_after_warm_up(sharded_run):
    """Three steps from the same parameters and batches; the learning rate warms up from 0, so the
    comparison is of the state after steps 2 and 3, whose updates are not zero."""
    single, sharded = sharded_run["single"], sharded_run["sharded"]
    lr = single["lr"]
    assert lr[0] == 0.0 and lr[1] > 0 and lr[2] > lr[1]
    # Losses and gradient norms: the same sums, reassociated across devices (float32).
    np.testing.assert_allclose(sharded["loss"], single["loss"], rtol=2e-5)
    np.testing.assert_allclose(sharded["grad_norm"], single["grad_norm"], rtol=1e-5)
    assert single["params"].keys() == sharded["params"].keys() == single["init"].keys()
    moved = [k for k in single["params"]
             if np.abs(np.subtract(single["params"][k], single["init"][k])).max() > 0]
    assert len(moved) > 100, len(moved)
    # The update is not zero: Adam moves each parameter with a gradient by about lr per step.
    step = lr[1] + lr[2]
    assert max(np.abs(np.subtract(single["params"][k], single["init"][k])).max() for k in moved) > 0.5 * step
    # Adam's first moment is linear in the gradients: equal up to float32 reassociation, relative to
    # the gradient's overall size (one leaf's gradient can be a sum that cancels to ~1e-7).
    scale = np.sqrt(sum(np.sum(np.square(v)) for v in single["mu"].values()))
    for k in single["mu"]:
        assert np.linalg.norm(np.subtract(sharded["mu"][k], single["mu"][k])) <= 1e-5 * scale, k
    # Parameters: Adam divides each element's moment by its own RMS, which turns such a cancelling
    # gradient's reassociation error into up to ~1% of its update (measured 0.6% on one bias, 1.6e-5
    # or less on every other leaf): within 1% of the two steps' learning rates, element by element.
    for k in single["params"]:
        np.testing.assert_allclose(sharded["params"][k], single["params"][k], rtol=0, atol=1e-2 * step, err_msg=k)


@pytest.mark.parametrize("op", ["gdn", "dswa"])
def test_pallas_kernels_run_inside_shard_map_on_the_mesh(sharded_run, op):
    r = sharded_run["pallas_in_shard_map"][op]
    assert r["shard_map_in_program"]
    assert r["value_err"] < 1e-5 and r["grad_err"] < 1e-4, r


def test_mesh_shape_fills_minus_one_and_rejects_bad_shapes():
    assert mesh_shape(dict(data=-1, fsdp=2, tensor=1, context=1), 8) == (4, 2, 1, 1)
    assert mesh_shape(dict(data=2, fsdp=2, tensor=2, context=1), 8) == (2, 2, 2, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        mesh_shape(dict(data=-1, fsdp=-1, tensor=1, context=1), 8)
    with pytest.raises(ValueError, match="not divisible"):
        mesh_shape(dict(data=-1, fsdp=3, tensor=1, context=1), 8)
    with pytest.raises(ValueError, match="needs 4 devices, have 8"):
        mesh_shape(dict(data=2, fsdp=2, tensor=1, context=1), 8)


def test_logical_rules_drop_axes_that_do_not_divide():
    class FakeMesh:
        shape = {"data": 2, "fsdp": 4, "tensor": 2, "context": 1}

    rules = tiny_config().logical_axis_rules
    assert tuple(logical_to_mesh_spec(("act_batch", None), rules, FakeMesh(), (16, 3))) == (("data", "fsdp"), None)
    # 6 is not divisible by data*fsdp = 8: fsdp is dropped, data kept.
    assert tuple(logical_to_mesh_spec(("act_batch", None), rules, FakeMesh(), (6, 3))) == ("data", None)
    # A mesh axis is used once per array.
    assert tuple(logical_to_mesh_spec(("heads", "mlp"), rules, FakeMesh(), (4, 4))) == ("tensor", None)
