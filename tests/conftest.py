"""Shared fixtures: a tiny model config and synthetic batches in the pipeline's batch format."""

import os

# Tests compile many small programs: XLA:CPU's cheapest backend optimisation level halves compile
# time (numerics are unchanged: it only skips LLVM optimisation passes).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import collections
import contextlib

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import kairos_jax  # noqa: F401, E402  (sets flax config)
from experiments import base  # noqa: E402
from tests.skip_guard import pytest_addoption, pytest_sessionfinish  # noqa: E402, F401


def pytest_configure(config):
    # Identical programs compiled by several tests (e.g. the same train step in an interrupted and
    # a resumed run) are compiled once per session.
    cache = os.path.join(str(config.rootpath), ".pytest_jax_cache")
    jax.config.update("jax_compilation_cache_dir", os.environ.get("KAIROS_TEST_JAX_CACHE", cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory):
    """`python -m data_pipelines.generate --preset=tiny --seed=0` into a session folder; its path."""
    from data_pipelines.generate import generate

    out = tmp_path_factory.mktemp("tiny_data")
    generate("tiny", str(out), seed=0)
    return str(out)


def tiny_config(**model):
    c = base.get_base_config()
    c.model.update(dict(video_width=32, action_width=16, depth=4, num_heads=2, head_dim=8, text_width=16,
                        text_depth=1, text_heads=2, cond_dim=16, dtype="float32", mlp_ratio=2.0, window=2,
                        dilation=2, gdn_chunk_size=8))
    c.model.update(model)
    c.data.update(dict(image_size=8, patch_size=4, num_blocks=6, action_chunk=2, action_dim=3, proprio_dim=16,
                       text_len=8, num_embodiments=4))
    c.train.update(dict(batch_size=4, warmup_steps=2, log_every=1, checkpoint_every=2,
                        async_checkpointing=False, measure_peak_flops=False))
    return c


def synthetic_batch(cfg, batch_size, seed=0, *, action_free=()):
    """A batch with the pipeline's keys, shapes and value ranges (independent of data_pipelines)."""
    d = cfg.data
    r = np.random.default_rng(seed)
    n = (d.image_size // d.patch_size) ** 2
    dp = d.patch_size ** 2 * d.channels
    B, T, k, A = batch_size, d.num_blocks, d.action_chunk, d.action_dim
    dim_mask = np.zeros((B, A), np.float32)
    dim_mask[:, :2] = 1.0
    action_mask = np.ones((B, T), np.float32)
    action_mask[:, 0] = 0.0
    for i in action_free:
        action_mask[i] = 0.0
        dim_mask[i] = 0.0
    actions = r.uniform(-1, 1, (B, T, k, A)).astype(np.float32) * dim_mask[:, None, None]
    text = np.zeros((B, d.text_len), np.int32)
    text[:, :4] = r.integers(1, 257, (B, 4))
    return {
        "video": r.uniform(-1, 1, (B, T, n, dp)).astype(np.float32),
        "actions": actions,
        "action_mask": action_mask,
        "action_dim_mask": dim_mask,
        "embodiment_id": r.integers(0, d.num_embodiments, (B,)).astype(np.int32),
        "text": text,
        "source_id": (np.arange(B) % 2).astype(np.int32),
        "proprio": r.uniform(-1, 1, (B, T, d.proprio_dim)).astype(np.float32),
        "proprio_mask": np.ones((B, T), np.float32),
        "proprio_dim_mask": (np.arange(d.proprio_dim) < 2).astype(np.float32)[None].repeat(B, 0),
        "progress": np.linspace(0, 1, T, dtype=np.float32)[None].repeat(B, 0),
    }


def setup_on_mesh(cfg, mesh_cfg: dict, devices):
    """A copy of cfg with its mesh axes set to mesh_cfg, the mesh over `devices`, and the model
    setup on it: (config, setup)."""
    from kairos_jax.parallel.sharding import create_mesh
    from kairos_jax.training import step as trainer

    c = cfg.copy_and_resolve_references()
    c.mesh.update(mesh_cfg)
    return c, trainer.build_model_setup(c, create_mesh(c.mesh, devices))


@pytest.fixture
def tiny_cfg():
    return tiny_config()


@pytest.fixture
def float64_references():
    """x64 for a whole test. Do not use it around an op under test: the op then runs with x64 as no
    caller runs it. Scope `with jax.enable_x64(True)` around the float64 reference instead (the
    Pallas kernel tests do; tests/float64_checks.py)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture(autouse=True)
def no_session_wide_x64():
    """Tests that need float64 enable it in a scope (`with jax.enable_x64(True)`) around the float64
    reference only, never around the op under test (it runs in the dtype its callers use); a module
    that flips it for the whole session silently changes every later test's numerics."""
    assert not jax.config.jax_enable_x64, "jax_enable_x64 leaked from an earlier test module"
    yield


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """Frees each test module's compiled programs when the module ends. XLA:CPU maps every compiled
    executable's code into the process (LLVM sections); over the whole suite in one process these
    mappings pass the kernel's vm.max_map_count (65,530 by default) and the next compile aborts the
    process ("LLVM ERROR: Unable to allocate section memory"). Programs a later module needs again
    come back from the persistent compilation cache."""
    yield
    import gc

    jax.clear_caches()
    gc.collect()


@contextlib.contextmanager
def count_split_paths():
    """Counts, by op name, the traces of context parallelism's per-shard bodies (the split path of
    kairos_jax.parallel.context_parallel) while the block runs."""
    from kairos_jax.parallel import context_parallel

    counts = collections.Counter()
    originals = {name: getattr(context_parallel, f"{name}_shard") for name in ("window_attention", "gated_delta_rule")}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    try:
        for name, fn in originals.items():
            setattr(context_parallel, f"{name}_shard", counting(name, fn))
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(context_parallel, f"{name}_shard", fn)

