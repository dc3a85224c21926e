"""Streaming rollout: per-step latency and cache memory against the horizon, hybrid vs full attention.

    flock /tmp/kairos_bench.lock python -m benchmarks.rollout --out=rollout.json [--steps=64,256,1024,4096]

Two models of the same width and depth (the embedded size, experiments/sizes.py: video width 128,
action width 64, 4 layers, 4 heads of 32, 32x32 frames in 16 patches + 4 action tokens = 20 tokens
per block): "hybrid" repeats [swa, swa, dswa, gdn] (window 8, dilation 4); "full" uses
block-causal full attention in every layer with a growing K/V cache. Both
roll out one clip (batch 1) in simulate mode: "step s" generates the s-th block (s - 1 blocks in the
caches) with `--euler` Euler steps and commits it, i.e. one `StreamingEngine.step`.

The hybrid model's caches are filled by committing real blocks one at a time up to every measured
step (the engine's own commit; video and actions drawn once at random): 4095 commits take about
half a minute. Doing the same for the full model costs O(n^2) (a commit at step s attends over all
s - 1 blocks) and took over 20 minutes on the 2-core CPU, so its caches are set directly: the
state at step s has position s - 1 and random keys/values in its s - 1 filled slots. The work of a
step depends only on the shapes and the position (masks), never on the cached values, so its
latency is the same. The full model's cache grows by doubling, so its step compiles once per power
of two; the slots past the current block are masked.

Compilation is excluded: every (model, step) is called once before timing. Then every (model,
step) is timed round-robin, `--reps` rounds, so that all figures are measured side by side in the
same conditions (in a new random order every round); the figure is the median over rounds. Writes a JSON list of
{"model", "step", "latency_ms", "cache_bytes"}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from experiments import base, sizes
from kairos_jax.inference.streaming import StreamingEngine, cache_bytes
from kairos_jax.model import KairosWorldModel

MODELS = {"hybrid": ("swa", "swa", "dswa", "gdn"), "full": ("full",)}


def make_model(pattern, seed: int = 0):
    """The embedded-size model with `pattern`, parameters random (N(0, 0.02^2)): latency does not
    depend on their values, and random weights keep every residual branch active."""
    c = base.get_base_config()
    sizes.apply_size(c, "embedded")
    c.model.update(dict(pattern=tuple(pattern), window=8, dilation=4))
    abstract = nnx.eval_shape(lambda: KairosWorldModel(c.model, c.data, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves, tree = jax.tree.flatten(state)
    r = np.random.default_rng(seed)
    leaves = [jnp.asarray(0.02 * r.standard_normal(x.shape), x.dtype) for x in leaves]
    return nnx.merge(graphdef, jax.tree.unflatten(tree, leaves)), c


def block_inputs(model, seed: int = 0):
    lay = model.layout
    r = np.random.default_rng(seed)
    video = jnp.asarray(r.uniform(-1, 1, (1, lay.video_tokens, lay.patch_dim)), jnp.float32)
    actions = jnp.asarray(r.uniform(-1, 1, (1, lay.action_tokens, lay.action_dim)), jnp.float32)
    return video, actions


def states_at(engine, model, steps, text, dim_mask):
    """Rollout states with s - 1 committed blocks for every s in `steps` (committed one by one)."""
    video, actions = block_inputs(model)
    zeros = np.zeros(1, np.float32)
    state = engine.start(text, jnp.zeros(1, jnp.int32), dim_mask)
    out = {}
    for s in sorted(steps):
        while int(state.position) < s - 1:
            state = engine.commit(state, video, actions, zeros, zeros)
        # grown for the block it is about to write; a copy, since the next commit consumes `state`
        out[s] = jax.tree.map(jnp.copy, engine._room(state))
    return out


def states_set_at(engine, steps, text, dim_mask):
    """Rollout states at position s - 1 with random K/V in the filled slots (see the docstring)."""
    r = np.random.default_rng(0)
    out = {}
    for s in sorted(steps):
        state = engine.start(text, jnp.zeros(1, jnp.int32), dim_mask).replace(position=jnp.int32(s - 1))
        state = engine._room(state)
        caches = jax.tree.map(lambda x: jnp.asarray(r.standard_normal(x.shape), x.dtype), state.caches)
        out[s] = state.replace(caches=caches)
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="JSON file of records")
    parser.add_argument("--steps", default="64,256,1024,4096")
    parser.add_argument("--euler", type=int, default=4, help="Euler steps per block")
    parser.add_argument("--reps", type=int, default=21, help="timed rounds")
    args = parser.parse_args(argv)
    steps = [int(s) for s in args.steps.split(",")]

    engines, states = {}, {}
    for name, pattern in MODELS.items():
        model, cfg = make_model(pattern)
        engine = StreamingEngine(model, num_steps=args.euler, full_capacity=64)
        text = jnp.zeros((1, cfg.data.text_len), jnp.int32)
        t0 = time.perf_counter()
        dim_mask = jnp.ones((1, cfg.data.action_dim), jnp.float32)
        if name == "hybrid":
            states[name] = states_at(engine, model, steps, text, dim_mask)
        else:
            states[name] = states_set_at(engine, steps, text, dim_mask)
        engines[name] = (engine, model)
        print(f"{name}: caches up to step {max(steps)} ready in {time.perf_counter() - t0:.1f} s", flush=True)

    # The step consumes (donates) its state: each timed call gets a fresh copy, made outside the timer.
    calls = {}
    for name, (engine, model) in engines.items():
        video, actions = block_inputs(model, seed=1)
        for s, state in states[name].items():
            def call(fresh, engine=engine, actions=actions):
                return engine.step(fresh, jax.random.key(0), mode="simulate", actions=actions)

            jax.block_until_ready(call(jax.tree.map(jnp.copy, state)))   # compile and warm, untimed
            calls[(name, s)] = call
    times = {key: [] for key in calls}
    order = list(calls)
    shuffle = np.random.default_rng(0)
    for _ in range(args.reps):
        shuffle.shuffle(order)       # no (model, step) always runs right after the 300 MB full step
        for key in order:
            fresh = jax.block_until_ready(jax.tree.map(jnp.copy, states[key[0]][key[1]]))
            t = time.perf_counter()
            out = jax.block_until_ready(calls[key](fresh))
            times[key].append(time.perf_counter() - t)
            del out, fresh

    records = [{"model": name, "step": s, "latency_ms": 1e3 * statistics.median(times[(name, s)]),
                "cache_bytes": cache_bytes(states[name][s])} for (name, s) in calls]
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(records, f, indent=1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, jax {jax.__version__} "
          f"on {jax.default_backend()}; {args.euler} Euler steps per block, median of {args.reps} rounds")
    for r in records:
        mib = r["cache_bytes"] / 2 ** 20
        print(f"{r['model']:>6} step {r['step']:>5}: {r['latency_ms']:9.2f} ms  cache {mib:9.2f} MiB")
    hyb = {r["step"]: r for r in records if r["model"] == "hybrid"}
    full = {r["step"]: r for r in records if r["model"] == "full"}
    lo, hi = min(steps), max(steps)
    print(f"hybrid latency step {hi} / step {lo}: {hyb[hi]['latency_ms'] / hyb[lo]['latency_ms']:.3f} (goal <= 1.05)")
    print(f"full / hybrid latency at step {hi}: {full[hi]['latency_ms'] / hyb[hi]['latency_ms']:.1f}x (goal >= 20)")
    print(f"hybrid cache bytes constant: {len({r['cache_bytes'] for r in hyb.values()}) == 1}")


if __name__ == "__main__":
    main()
