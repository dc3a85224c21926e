"""The step-time model checked against a step we can run: the train step compiled for this host's CPU,
estimated with the CPU's measured matmul peak and memory bandwidth, then timed for real.

`python -m kairos_jax.compile --config=embedded --topology=cpu --estimate --measure`
"""

from __future__ import annotations

import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from kairos_jax.config import validate
from kairos_jax.model.world_model import count_params
from kairos_jax.parallel.sharding import activation_sharding, create_mesh
from kairos_jax.scaling import estimate as est
from kairos_jax.training import step as trainer
from kairos_jax.training.metrics import measure_peak_flops


def measure_bandwidth(nbytes: float = 256 * 2 ** 20, reps: int = 5, inner: int | None = None) -> float:
    """Achieved memory bandwidth of the host (bytes read + written per second) on a streaming
    elementwise op over an array of `nbytes`, repeated `inner` times inside one jitted loop (so small
    arrays are not timed against dispatch), best of `reps`."""
    n = max(1024, int(nbytes) // 4)
    inner = inner or max(1, int(2 ** 30 // (8 * n)))
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: jax.lax.fori_loop(0, inner, lambda _, b: b * 1.0001 + 1.0, a))
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes * inner / best


def random_batch(setup, seed: int = 0) -> dict:
    """A batch of the batch contract's shapes with values in the pipeline's ranges."""
    r = np.random.default_rng(seed)
    out = {}
    for key, s in trainer.abstract_batch(setup).items():
        if key == "text":
            x = r.integers(1, 257, s.shape).astype(np.int32)
        elif np.dtype(s.dtype).kind == "i":
            x = np.zeros(s.shape, s.dtype)
        elif key.endswith("mask"):
            x = np.ones(s.shape, s.dtype)
        elif key == "progress":
            x = np.broadcast_to(np.linspace(0, 1, s.shape[-1], dtype=s.dtype), s.shape).copy()
        else:
            x = r.uniform(-1, 1, s.shape).astype(s.dtype)
        out[key] = jax.device_put(x, s.sharding)
    return out


def measure_host_step(cfg, phase: str | None = None, *, steps: int = 5, seed: int = 0, run: bool = True) -> dict:
    """Compile the train step of `cfg` for one CPU device, estimate it, run it `steps` times.

    Returns a dict with the estimate's summary, the host's measured peak and bandwidth and, with
    `run`, the measured step (best of `steps`, like the peak and bandwidth it is compared with; the
    median beside it) and the relative error (estimate / measured - 1)."""
    from kairos_jax.scaling.aot import step_flops  # noqa: PLC0415 (aot imports this module's siblings)

    cfg = cfg.copy_and_resolve_references()
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=1, context=1))
    validate(cfg)
    phase = phase or cfg.curriculum[0]
    devices = jax.devices("cpu")[:1]
    mesh = create_mesh(cfg.mesh, devices)
    setup = trainer.build_model_setup(cfg, mesh)
    phase_cfg = cfg.phases[phase]
    tx = trainer.make_optimizer(cfg.train, phase_cfg.steps)
    step = trainer.make_train_step(cfg, setup, tx, phase_cfg, num_sources=len(phase_cfg.mixture))
    state = trainer.init_train_state(cfg, setup, tx, trainer.init_params(cfg, setup, seed))
    batch = random_batch(setup, seed)
    with activation_sharding(setup.mesh, setup.rules):
        compiled = step.jitted.lower(state, batch).compile()
    flops, _ = step_flops(cfg, mesh, phase)
    plain = cfg.copy_and_resolve_references()
    plain.model.remat = "none"
    model_flops = flops if cfg.model.remat == "none" else step_flops(plain, mesh, phase)[0]

    dtype = "bfloat16" if cfg.model.dtype == "bfloat16" else "float32"
    peak = measure_peak_flops(dtype, n=1024, reps=8)
    text = compiled.as_text()
    working_set = est.typical_op_bytes(text)
    bandwidth = measure_bandwidth(working_set)
    dram_bandwidth = measure_bandwidth()
    lay = setup.layout
    tokens = cfg.train.batch_size * lay.num_blocks * lay.block_size
    e = est.estimate(text, est.host_target(peak, bandwidth), step_flops=flops, model_flops=model_flops, chips=1,
                     tokens_per_step=tokens)
    e_dram = est.estimate(text, est.host_target(peak, dram_bandwidth), step_flops=flops, model_flops=model_flops,
                          chips=1, tokens_per_step=tokens)

    out = {"params": count_params(setup.abstract_params), "tokens_per_step": tokens, "host_peak_flops": peak,
           "host_bandwidth": bandwidth, "working_set_bytes": working_set, "host_dram_bandwidth": dram_bandwidth,
           "estimated_step_s": e.step_s, "estimated_step_dram_s": e_dram.step_s, "estimate": e.summary(),
           "estimate_obj": e}
    if not run:
        return out
    for _ in range(2):  # warm-up (the state is donated: carry the returned one)
        state, metrics = compiled(state, batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready((state, metrics))
        times.append(time.perf_counter() - t)
    best = min(times)
    out.update(measured_step_s=best, measured_median_s=statistics.median(times), measured_steps_s=times,
               relative_error=e.step_s / best - 1.0, relative_error_dram=e_dram.step_s / best - 1.0,
               measured_mfu=model_flops / (peak * best))
    return out
