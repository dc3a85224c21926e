"""kairos_jax.scaling.aot compiles the real train step for a TPU slice without a TPU (libtpu's compiler) and
reports memory and FLOPs that agree with independent counts.

The compiles need `jax[tpu]` (libtpu) and carry the marker `tpu` (skipped without libtpu); run them
with `python -m pytest -m tpu tests/test_aot.py -s` to see the printed reports. The FLOP counter, the
topology parser and the missing-plugin errors are pure Python and run in the default suite.
"""

import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import base
from kairos_jax.scaling import aot
from kairos_jax.training import step as trainer


@pytest.fixture(scope="module")
def libtpu():
    pytest.importorskip("libtpu")


def shard_bytes(tree) -> int:
    """Bytes of one device's shard of every leaf (ShapeDtypeStructs carrying NamedShardings)."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def test_matmul_flops_counts_every_scan_iteration_and_the_gradient():
    M, K, L = 64, 128, 8

    def f(x, w):
        def body(c, wi):
            return jnp.tanh(c @ wi), None
        return jnp.sum(jax.lax.scan(body, x, w)[0])

    x, w = jax.ShapeDtypeStruct((M, K), jnp.float32), jax.ShapeDtypeStruct((L, K, K), jnp.float32)
    one = 2 * M * K * K                      # one [M, K] @ [K, K]
    assert aot.matmul_flops(jax.make_jaxpr(f)(x, w).jaxpr) == (L * one, [])
    # Gradient w.r.t. w: the forward scan, then per step c^T @ g (dw) and g @ w^T (dc).
    assert aot.matmul_flops(jax.make_jaxpr(jax.grad(f, argnums=1))(x, w).jaxpr) == (3 * L * one, [])

    def g(x, w):  # a cond counts its most expensive branch; a while loop is flagged
        y = jax.lax.cond(jnp.sum(x) > 0, lambda a: a @ w[0] @ w[1], lambda a: a @ w[0], x)
        return jax.lax.while_loop(lambda c: jnp.sum(c) < 0, lambda c: c @ w[2], y)

    flops, unknown = aot.matmul_flops(jax.make_jaxpr(g)(x, w).jaxpr)
    assert flops == 3 * one and unknown == ["while"]


def test_bad_topologies_name_the_problem():
    with pytest.raises(aot.AotError, match="accelerator one of"):
        aot.parse_topology("v9:2x2x2")
    with pytest.raises(aot.AotError, match="v5p shapes have 3 numbers"):
        aot.parse_topology("v5p:2x4")
    with pytest.raises(aot.AotError, match="positive integers"):
        aot.parse_topology("v6e:2xfour")
    with pytest.raises(aot.AotError, match=r"h100 shapes have 2 numbers, e.g. 2x8 \(hosts x GPUs per host\)"):
        aot.parse_topology("h100:8")
    assert aot.parse_topology("v6e:4x8") == ("v6e", (4, 8))
    assert aot.parse_topology("h100:2x8") == ("h100", (2, 8))


def test_missing_compiler_plugins_are_clear_errors(monkeypatch):
    monkeypatch.setattr(aot, "libtpu_available", lambda: False)
    with pytest.raises(aot.AotError, match=r"needs libtpu .* pip install \"jax\[tpu\]=="):
        aot.topology_devices("v5p:2x2x2")
    monkeypatch.setattr(aot, "cuda_plugin_available", lambda: False)
    with pytest.raises(aot.AotError, match=r"needs the CUDA PJRT plugin .* pip install \"jax-cuda12-plugin=="):
        aot.topology_devices("h100:1x8")


def small_config():
    """The base size (width 256, 8 layers, bf16 compute) on 8 chips as fsdp=4 x tensor=2, full remat."""
    c = base.get_base_config()
    c.mesh.update(dict(data=1, fsdp=4, tensor=2, context=1))
    c.model.remat = "full"
    c.train.batch_size = 16
    return c


def check_report(report, cfg):
    print("\n" + report.format())
    assert report.fits, report.format()
    # Arguments are the state's and the batch's shards: at least their bytes (TPU layouts pad small
    # arrays to tiles, so not exactly).
    devices = aot.topology_devices(report.topology)
    setup = trainer.build_model_setup(cfg, aot.create_mesh(cfg.mesh, devices))
    phase = cfg.phases[report.phase]
    state = trainer.abstract_train_state(trainer.make_optimizer(cfg.train, phase.steps), setup)
    state_bytes, batch_bytes = shard_bytes(state), shard_bytes(trainer.abstract_batch(setup))
    assert state_bytes + batch_bytes <= report.argument_bytes <= 2 * (state_bytes + batch_bytes) + 2 ** 20
    # The donated state comes back in the same buffers.
    assert state_bytes <= report.alias_bytes <= report.argument_bytes
    assert report.temp_bytes > 0 and report.code_bytes > 0
    # Full remat runs each unit's forward again in the backward pass: 4 forward-sized passes of the
    # remat'ed units instead of 3, so the compiled step does at most 4/3 of the model FLOPs.
    ratio = report.step_flops / report.model_flops
    assert 1.15 < ratio <= 4 / 3 + 1e-6, ratio


@pytest.mark.tpu
def test_small_config_compiles_and_fits_v5p_2x2x2(libtpu):
    cfg = small_config()
    report = aot.compile_for_topology(cfg, "v5p:2x2x2")
    assert report.chips == 8 and report.device_kind == "TPU v5"
    assert report.mesh == {"data": 1, "fsdp": 4, "tensor": 2, "context": 1}
    check_report(report, cfg)


@pytest.mark.tpu
def test_4b_config_reduced_depth_compiles_and_fits_v5p_2x2x2(libtpu):
    """The 4B model's widths, heads and token layout with 4 layers (one [swa, swa, dswa, gdn] unit)
    instead of 32, and one clip per chip, so that XLA:TPU compiles it in minutes on this CPU."""
    from experiments import kairos_4b

    cfg = kairos_4b.get_config()
    cfg.model.depth = 4
    cfg.train.batch_size = 8
    report = aot.compile_for_topology(cfg, "v5p:2x2x2")
    assert report.mesh == {"data": 1, "fsdp": 8, "tensor": 1, "context": 1}
    check_report(report, cfg)


@pytest.mark.tpu
def test_context_parallel_step_compiles_with_pallas_kernels_v5p_2x2x2(libtpu, monkeypatch):
    """fsdp=2 x tensor=2 x context=2: the mixers take the context-parallel path (halo by
    collective-permute, GDN state hand-off) and still run as Mosaic kernels inside shard_map."""
    from jax import stages

    from tests.conftest import count_split_paths

    compiled = {}
    compile_ = stages.Lowered.compile

    def keep(self, *a, **kw):
        compiled["step"] = compile_(self, *a, **kw)
        return compiled["step"]

    monkeypatch.setattr(stages.Lowered, "compile", keep)
    cfg = small_config()
    cfg.mesh.update(dict(fsdp=2, tensor=2, context=2))
    with count_split_paths() as traced:
        report = aot.compile_for_topology(cfg, "v5p:2x2x2")
    assert report.mesh == {"data": 1, "fsdp": 2, "tensor": 2, "context": 2}
    assert traced.get("window_attention", 0) > 0 and traced.get("gated_delta_rule", 0) > 0, traced
    hlo = compiled["step"].as_text()
    assert "collective-permute" in hlo
    for kernel in ("window_attention_fwd_tpu", "window_attention_dq_tpu", "window_attention_dkv_tpu",
                   "gdn_fwd_tpu", "gdn_bwd_tpu"):
        assert kernel in hlo, kernel
    check_report(report, cfg)


@pytest.mark.tpu
def test_v6e_and_v4_topologies_have_one_device_per_chip(libtpu):
    assert len(aot.topology_devices("v6e:2x4")) == 8
    assert len(aot.topology_devices("v4:2x2x2")) == 8      # megacore: one device per chip




@pytest.mark.slow
def test_h100_target_compiles_through_the_cli():
    """GPU target: the CUDA PJRT plugin compiles for 8 H100s from a target description, no GPU here.
    Marked slow (not tpu): it needs jax-cuda12-plugin instead of libtpu."""
    pytest.importorskip("jax_plugins.xla_cuda12")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-m", "kairos_jax.compile", "--config=experiments/embedded.py",
                          "--topology=h100:1x8", "--config.mesh.data=2", "--config.mesh.fsdp=4", "--estimate"],
                         cwd=root, capture_output=True, text=True, timeout=1800,
                         env=dict(os.environ, PYTHONPATH=root))
    print(out.stdout)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "8 devices (NVIDIA H100 80GB HBM3), mesh {'data': 2, 'fsdp': 4, 'tensor': 1, 'context': 1}" in out.stdout
    assert "FITS" in out.stdout
    e = json.loads(out.stdout.strip().splitlines()[-1])["estimate"]
    assert 0 < e["mfu"] < 1 and e["step_s"] >= e["ops_s"] > 0
    # data=2 x fsdp=4 inside one host: gradient and parameter collectives over NVLink
    assert set(e["collectives"]) & {"all-reduce", "all-gather", "reduce-scatter"}, e["collectives"]


@pytest.mark.tpu
def test_estimate_of_a_v5p_compile(libtpu):
    """The step-time model on a real XLA:TPU program (fsdp=4 x tensor=2 on v5p:2x2x2): every loop
    has a known trip count, the HLO's matmul FLOPs plus the share given to the Mosaic kernels are
    within the bounds below of the jaxpr's count, the collectives are found with the mesh's group
    sizes, and the time is at least the roofline sum."""
    cfg = small_config()
    report = aot.compile_for_topology(cfg, "v5p:2x2x2")
    e = report.estimate()
    print("\n" + e.format())
    assert e.unknown_loops == 0
    assert e.step_s >= e.ops_s >= e.compute_s > 0 and 0 < e.mfu < 1
    # XLA:TPU's own matmuls come out ~13 % above the jaxpr's count of the compiled step (measured:
    # 2.378e10 vs 2.109e10 per chip here; 1.288e15 vs 1.131e15 for kairos_4b on v5p-64), so the
    # kernels get no FLOPs. Not resolved (XLA recomputation the jaxpr does not show, or an
    # over-count of TPU convolutions in hlo.dot_flops): bounded here, recorded in RESULTS.md.
    jaxpr_per_chip = report.step_flops / report.chips
    assert 0.95 * jaxpr_per_chip <= e.hlo_flops + e.kernel_flops <= 1.2 * jaxpr_per_chip
    kinds = e.collectives_by_kind()
    assert kinds and all(c.group_size in (2, 4, 8) for c in e.collectives), kinds


_SM90_RECURRENCES = """
import jax, jax.numpy as jnp
from kairos_jax.scaling import aot
from pallas_kernels.gated_delta_rule.pallas import gated_delta_rule_pallas
from pallas_kernels.gla.pallas import gla_pallas
device = aot.topology_devices("h100:1x1")[0]
sd = lambda *s, dt=jnp.bfloat16: jax.ShapeDtypeStruct(s, dt, sharding=jax.sharding.SingleDeviceSharding(device))
x, gate = sd(1, 1024, 4, 128), sd(1, 1024, 4, dt=jnp.float32)
gdn = lambda q, k, v, g, b: gated_delta_rule_pallas(q, k, v, g, b, backend="gpu", interpret=False)
gla = lambda q, k, v, g: gla_pallas(q, k, v, g, backend="gpu", interpret=False)
loss = lambda f: lambda *a: sum(jnp.sum(o.astype(jnp.float32)) for o in f(*a))
with jax.set_mesh(jax.sharding.Mesh([device], ("x",))):  # Triton reads the device kind from the mesh
    t1 = jax.jit(jax.grad(loss(gdn), argnums=(0, 1, 2, 3, 4))).lower(x, x, x, gate, gate).compile().as_text()
    t2 = jax.jit(jax.grad(loss(gla), argnums=(0, 1, 2, 3))).lower(x, x, x, sd(1, 1024, 4, 128, dt=jnp.float32)
                                                                  ).compile().as_text()
print(device.device_kind, *[n in t for t, n in ((t1, "gdn_fwd_gpu"), (t1, "gdn_bwd_gpu"), (t2, "gla_fwd_gpu"),
                                                (t2, "gla_bwd_gpu"))])
"""


@pytest.mark.gpu_aot
def test_gdn_and_gla_triton_kernels_compile_for_sm90():
    """The chunk-recurrence kernels stay on Pallas Triton (deprecated in jax 0.12, still lowered):
    their forward and backward compile for an H100 through XLA's GPU compiler (jax-cuda12-plugin,
    no GPU). Skipped without the plugin (`pip install -e ".[gpu-aot]"`)."""
    pytest.importorskip("jax_plugins.xla_cuda12")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", _SM90_RECURRENCES], cwd=root, capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, PYTHONPATH=root, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "NVIDIA H100 80GB HBM3 True True True True", out.stdout
