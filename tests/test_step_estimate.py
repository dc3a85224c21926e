"""The step-time model (kairos_jax/scaling/estimate.py) and its HLO reader (kairos_jax/scaling/hlo.py).

Checked against counts made independently of the model: matmul FLOPs of a scanned program known in
closed form, collective sizes and groups of a sharded program known from its shardings, the
ring-algorithm times written out by hand, and, through the command line, a real step on this CPU.
This module is also a config file for that command line (`get_config`).
"""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kairos_jax.scaling import estimate as est
from kairos_jax.scaling import hlo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_config(arg: str = ""):
    """A tiny model for `python -m kairos_jax.compile --config=tests/test_step_estimate.py`."""
    del arg
    from tests.conftest import tiny_config

    return tiny_config()


def toy_target(n, *, kind="switch", per_host=None, link=1e10, inter=1e9, latency=1e-6, hop=0.0):
    per_host = per_host or n
    if kind == "torus":
        coords = tuple((i % per_host, i // per_host, 0) for i in range(n))
        sizes = (per_host, n // per_host, 1)
        net = est.Network("torus", link, wraps=True, latency_s=latency, hop_latency_s=hop)
    else:
        coords = tuple((i // per_host, i % per_host) for i in range(n))
        sizes = (n // per_host, per_host)
        net = est.Network("switch", link, inter, latency_s=latency, hop_latency_s=hop, inter_host_hop_latency_s=hop)
    return est.Target("toy", 1e12, 1e11, net, coords, sizes)


def test_scanned_matmul_flops_and_loop_trip_counts_from_compiled_hlo():
    """grad of an 8-step scan of [64,128] @ [128,128]: 3 matmuls per step, in the loop bodies of the
    optimized HLO, counted 8 times each through known_trip_count."""
    def f(x, w):
        return jnp.sum(jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0])

    x, w = jnp.ones((64, 128)), jnp.ones((8, 128, 128))
    text = jax.jit(jax.grad(f, argnums=1)).lower(x, w).compile().as_text()
    comps = hlo.parse_module(text)
    loops = [i for c in comps.values() for i in c.instrs if i.opcode == "while"]
    assert loops and all(hlo.trip_count(i, comps) == 8 for i in loops)
    e = est.estimate(text, est.host_target(1e12, 1e11), step_flops=0, model_flops=1, chips=1, tokens_per_step=1)
    assert e.hlo_flops == 3 * 8 * 2 * 64 * 128 * 128
    assert e.unknown_loops == 0
    # per-instruction roofline: never faster than either total alone
    assert e.step_s >= max(e.compute_s, e.hbm_s) - 1e-12 and e.ops_s == pytest.approx(e.step_s)


def test_replica_group_forms():
    ins = hlo.Instr("x", "f32[8]", "all-gather", ["a"], "replica_groups={{0,1},{2,3}}, dimensions={0}")
    assert hlo.replica_groups(ins, 4) == [[0, 1], [2, 3]]
    ins.attrs = "replica_groups=[2,4]<=[4,2]T(1,0), dimensions={0}"
    assert hlo.replica_groups(ins, 8) == [[0, 2, 4, 6], [1, 3, 5, 7]]
    ins.attrs = "replica_groups=mesh['a'=2,'b'=4] {'a'}, dimensions={0}"
    assert hlo.replica_groups(ins, 8) == [[0, 4], [1, 5], [2, 6], [3, 7]]
    ins.attrs = "replica_groups={}, to_apply=%add"
    assert hlo.replica_groups(ins, 4) == [[0, 1, 2, 3]]
    ins.attrs = "source_target_pairs={{0,1},{1,2},{2,3},{3,0}}"
    assert hlo.replica_groups(ins, 4) == [[0, 1], [1, 2], [2, 3], [3, 0]]


def test_ring_costs_by_collective_and_network():
    g = [list(range(8))]
    t = toy_target(8)
    R = 8e6
    assert est.collective_time("all-gather", R, g, t)[0] == pytest.approx(1e-6 + 7 / 8 * R / 1e10)
    assert est.collective_time("reduce-scatter", R, g, t)[0] == pytest.approx(1e-6 + 7 * R / 1e10)
    assert est.collective_time("all-reduce", R, g, t)[0] == pytest.approx(1e-6 + 2 * 7 / 8 * R / 1e10)
    # across hosts the NIC bandwidth sets the pace
    two_hosts = toy_target(8, per_host=4)
    assert est.collective_time("all-gather", R, g, two_hosts)[0] == pytest.approx(1e-6 + 7 / 8 * R / 1e9)
    assert est.collective_time("all-gather", R, [[0, 1, 2, 3]], two_hosts)[0] == pytest.approx(1e-6 + 3 / 4 * R / 1e10)
    # a torus ring that wraps runs both directions; a group over two axes drives two rings
    torus = toy_target(16, kind="torus", per_host=4)
    row = [[0, 1, 2, 3]]
    assert est.collective_time("all-gather", R, row, torus)[0] == pytest.approx(1e-6 + 3 / 4 * R / 2e10)
    assert est.collective_time("all-gather", R, [list(range(16))], torus)[0] == pytest.approx(1e-6 + 15 / 16 * R / 4e10)
    # a permute moves its bytes over one link, one way
    assert est.collective_time("collective-permute", R, [[0, 1], [1, 2]], torus)[0] == pytest.approx(1e-6 + R / 1e10)


def test_collectives_of_a_sharded_program():
    """An FSDP-style step on 4 CPU devices: per scan step the weight shard is all-gathered (forward
    and backward) and its gradient reduced; sizes and group size as the shardings say."""
    script = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import json, jax, jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from kairos_jax.scaling import estimate as est
mesh = Mesh(jax.devices()[:4], ("x",))
def f(x, w):
    return jnp.sum(jax.lax.scan(lambda c, wi: (jnp.tanh(c @ wi), None), x, w)[0])
x = jax.ShapeDtypeStruct((64, 128), jnp.float32, sharding=NamedSharding(mesh, P("x")))
w = jax.ShapeDtypeStruct((8, 128, 128), jnp.float32, sharding=NamedSharding(mesh, P(None, "x")))
text = jax.jit(jax.grad(f, argnums=1)).lower(x, w).compile().as_text()
net = est.Network("switch", 1e10, 1e9, latency_s=1e-6)
t = est.Target("toy", 1e12, 1e11, net, tuple((0, i) for i in range(4)), (1, 4))
e = est.estimate(text, t, step_flops=4 * 3 * 8 * 2 * 16 * 128 * 128, model_flops=1, chips=4, tokens_per_step=1)
print(json.dumps({k: v for k, v in e.collectives_by_kind().items()}))
print(json.dumps([[c.kind, c.bytes, c.group_size] for c in e.collectives]))
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    kinds = json.loads(out.stdout.splitlines()[-2])
    colls = json.loads(out.stdout.splitlines()[-1])
    assert all(size == 4 for _, _, size in colls), colls
    w_bytes = 128 * 128 * 4  # one layer's full weight
    # the gathered weight, forward and backward, each scan step
    assert kinds["all-gather"]["count"] == 16 and kinds["all-gather"]["bytes"] == 16 * w_bytes
    # the weight gradient leaves the loop reduced: an all-reduce or a reduce-scatter per step
    reduced = sum(kinds.get(k, {}).get("count", 0) for k in ("all-reduce", "reduce-scatter"))
    assert reduced == 8, kinds


def test_async_collective_is_hidden_behind_the_compute_scheduled_before_its_done():
    text = """HloModule m, is_scheduled=true

%fused_dot (p0: f32[1024,1024], p1: f32[1024,1024]) -> f32[1024,1024] {
  %p0 = f32[1024,1024]{1,0} parameter(0)
  %p1 = f32[1024,1024]{1,0} parameter(1)
  ROOT %d = f32[1024,1024]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

ENTRY %main (a: f32[1024,1024], b: f32[256,1024]) -> f32[1024,1024] {
  %a = f32[1024,1024]{1,0} parameter(0)
  %b = f32[256,1024]{1,0} parameter(1)
  %ags = (f32[256,1024]{1,0}, f32[1024,1024]{1,0}) all-gather-start(%b), \
channel_id=1, replica_groups={{0,1,2,3}}, dimensions={0}, use_global_device_ids=true
  %f = f32[1024,1024]{1,0} fusion(%a, %a), kind=kOutput, calls=%fused_dot
  %agd = f32[1024,1024]{1,0} all-gather-done(%ags)
  ROOT %g = f32[1024,1024]{1,0} fusion(%f, %agd), kind=kOutput, calls=%fused_dot
}
"""
    fl = 2 * 1024 ** 3
    t = toy_target(4)
    e = est.estimate(text, t, step_flops=2 * fl * 4, model_flops=2 * fl * 4, chips=4, tokens_per_step=1)
    ag = 1e-6 + 3 / 4 * 1024 * 1024 * 4 / 1e10
    one = max(fl / 1e12, 3 * 1024 * 1024 * 4 / 1e11)
    assert e.collective_s == pytest.approx(ag)
    assert e.step_s == pytest.approx(2 * one + max(0.0, ag - one))
    assert e.exposed_collective_s == pytest.approx(max(0.0, ag - one))
    # made synchronous, the same all-gather is exposed whole
    sync = text.replace("all-gather-start", "all-gather").replace(
        "(f32[256,1024]{1,0}, f32[1024,1024]{1,0}) all-gather(", "f32[1024,1024]{1,0} all-gather(").replace(
        "%agd = f32[1024,1024]{1,0} all-gather-done(%ags)", "%agd = f32[1024,1024]{1,0} copy(%ags)")
    e2 = est.estimate(sync, t, step_flops=2 * fl * 4, model_flops=2 * fl * 4, chips=4, tokens_per_step=1)
    assert e2.exposed_collective_s == pytest.approx(ag)


def test_in_place_updates_and_sliced_reads_count_what_moves():
    text = """HloModule m, is_scheduled=true

%fused_dus (p0: f32[64,1024,1024], p1: f32[1,1024,1024], p2: s32[]) -> f32[64,1024,1024] {
  %p0 = f32[64,1024,1024]{2,1,0} parameter(0)
  %p1 = f32[1,1024,1024]{2,1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %z = s32[] constant(0)
  ROOT %u = f32[64,1024,1024]{2,1,0} dynamic-update-slice(%p0, %p1, %p2, %z, %z)
}

%fused_ds (q0: f32[64,1024,1024], q1: s32[]) -> f32[1,1024,1024] {
  %q0 = f32[64,1024,1024]{2,1,0} parameter(0)
  %q1 = s32[] parameter(1)
  %z = s32[] constant(0)
  ROOT %s = f32[1,1024,1024]{2,1,0} dynamic-slice(%q0, %q1, %z, %z), dynamic_slice_sizes={1,1024,1024}
}

ENTRY %main (a: f32[64,1024,1024], b: f32[1,1024,1024], i: s32[]) -> f32[1,1024,1024] {
  %a = f32[64,1024,1024]{2,1,0} parameter(0)
  %b = f32[1,1024,1024]{2,1,0} parameter(1)
  %i = s32[] parameter(2)
  %u = f32[64,1024,1024]{2,1,0} fusion(%a, %b, %i), kind=kLoop, calls=%fused_dus
  ROOT %s = f32[1,1024,1024]{2,1,0} fusion(%u, %i), kind=kLoop, calls=%fused_ds
}
"""
    e = est.estimate(text, est.host_target(1e12, 1e11), step_flops=0, model_flops=1, chips=1, tokens_per_step=1)
    slab = 1024 * 1024 * 4
    assert e.hbm_bytes == pytest.approx(2 * slab + 2 * slab + 8)   # update read + written; slice read + written


@pytest.mark.slow
def test_cli_estimates_and_measures_a_cpu_step():
    """The command line on this host: compile, estimate with the measured peak and bandwidth, run,
    and report the relative error (its size is in benchmarks/RESULTS.md, not asserted: the machine
    is shared)."""
    out = subprocess.run([sys.executable, "-m", "kairos_jax.compile", "--config=tests/test_step_estimate.py",
                          "--topology=cpu", "--estimate", "--measure", "--measure_steps=2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=1200, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["topology"] == "cpu" and r["measured_step_s"] > 0 and r["estimated_step_s"] > 0
    assert np.isfinite(r["relative_error"]) and 0 < r["estimate"]["mfu"] <= 1
    assert "estimate / measured - 1" in out.stdout


def test_cli_refuses_measure_off_host():
    out = subprocess.run([sys.executable, "-m", "kairos_jax.compile", "--config=tests/test_step_estimate.py",
                          "--topology=v5p-8", "--measure"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 2 and "needs --topology=cpu" in out.stderr
