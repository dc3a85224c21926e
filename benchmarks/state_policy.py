"""A state-only MLP policy as the reference for the world model's policy, and a probe of what the
model's policy reads from the state (issue #12).

    PYTHONPATH=. python benchmarks/state_policy.py [--data_root=data/small] [--heldout=data/heldout] \\
        [--sources=reacher,pusher] [--steps=6000] [--batch=256] [--episodes=50] [--seed=0] \\
        [--probe=runs/A,runs/B] [--json=FILE]

MLP: the robot's state (proprio) where an action chunk starts -> the chunk's `--chunk` actions
(absolute units, each dim mapped p01..p99 -> [-1, 1] like the model's action codec), two hidden layers
of 256 with GELU, Adam, mean squared error; trained on every chunk start of `--data_root`'s episodes.
Reported per source: its held-out chunk MSE (regression, non-overlapping chunks of `--heldout`), the
same with only the arm's dims (the task's positions left out), and its closed-loop success in the
`kairos_jax.evaluate` task scenes (data_pipelines.sim.tasks, same seed: the same scenes), executing
each predicted chunk whole as the world model does, and replanning every step.

Probe (`--probe`, world-model or BC checkpoints with model.proprio_input): 128 held-out clips through
the training forward in policy mode: every action chunk pure noise at sigma = 1 (no action history),
the frames clean except the last block's, which is noise at sigma = 1 (its frame is what the chunk
leads to, which a policy does not see); the one-step x0 of the last block's chunk, i.e. the model's
regression E[a | frames so far, state]. Its MSE to the recorded actions, then how much the predicted
chunks move (MSE between predictions) when the state is hidden, when the task's dims (TASK_DIMS) are
negated, when the states are reversed across clips, and under a second noise draw (the floor).
(Before 2026-12-07 the probe left the last frame clean and scored every block: that lets the model
read each chunk's outcome, an inverse-dynamics question, and flattered its regression error.)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# The dims of each robot's proprio that hold the task's positions rather than the arm's own state
# (data_pipelines/sim/reacher.py and pusher.py, `proprio`): reacher's fingertip-to-target vector;
# pusher's fingertip, puck, puck velocity and goal.
TASK_DIMS = {"reacher": slice(6, 8), "pusher": slice(6, 14)}
HIDDEN = 256


def episodes(root: str, source: str) -> list:
    from data_pipelines.shards import ShardedSource

    data = ShardedSource(os.path.join(root, source)).data_source()
    return [ep for ep in (data[i] for i in range(len(data))) if ep.actions is not None and ep.proprio is not None]


def chunks(eps, chunk: int, stride: int, dims: slice | None = None):
    """(state at each chunk start [N, p], the chunk's actions flattened [N, chunk * a])."""
    x, y = [], []
    for ep in eps:
        p, a = ep.proprio.astype(np.float32), ep.actions.astype(np.float32)
        for s in range(0, len(a) - chunk + 1, stride):
            x.append(p[s] if dims is None else p[s, dims])
            y.append(a[s:s + chunk].reshape(-1))
    return np.stack(x), np.stack(y)


class MLPPolicy:
    """State -> action chunk regression (module docstring)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, chunk: int, *, steps: int, batch: int, seed: int):
        import jax
        import jax.numpy as jnp
        import optax

        self.chunk = chunk
        self.mu, self.sd = x.mean(0), x.std(0) + 1e-6
        self.lo, self.hi = np.percentile(y, 1, axis=0), np.percentile(y, 99, axis=0)
        self.hi = np.where(self.hi > self.lo, self.hi, self.lo + 1e-6)
        xn, yn = self.norm_x(x), self.norm_y(y)
        sizes = [x.shape[1], HIDDEN, HIDDEN, y.shape[1]]
        keys = jax.random.split(jax.random.key(seed), len(sizes) - 1)
        params = [(jax.random.normal(k, (m, n)) / np.sqrt(m), jnp.zeros(n)) for k, m, n in zip(keys, sizes, sizes[1:])]

        def forward(params, x):
            for w, b in params[:-1]:
                x = jax.nn.gelu(x @ w + b)
            return x @ params[-1][0] + params[-1][1]

        opt = optax.adam(1e-3)

        @jax.jit
        def step(params, state, x, y):
            loss, grads = jax.value_and_grad(lambda p: jnp.mean((forward(p, x) - y) ** 2))(params)
            updates, state = opt.update(grads, state)
            return optax.apply_updates(params, updates), state, loss

        state, rng = opt.init(params), np.random.default_rng(seed)
        for _ in range(steps):
            idx = rng.integers(0, len(xn), batch)
            params, state, _ = step(params, state, xn[idx], yn[idx])
        self.params, self.forward = params, jax.jit(forward)
        self.train_mse = self.mse(x, y)

    def norm_x(self, x):
        return ((x - self.mu) / self.sd).astype(np.float32)

    def norm_y(self, y):
        return (2 * (y - self.lo) / (self.hi - self.lo) - 1).astype(np.float32)

    def mse(self, x, y) -> float:
        return float(np.mean((np.asarray(self.forward(self.params, self.norm_x(x))) - self.norm_y(y)) ** 2))

    def __call__(self, state: np.ndarray) -> np.ndarray:
        yn = np.asarray(self.forward(self.params, self.norm_x(state[None].astype(np.float32))))[0]
        return ((yn + 1) / 2 * (self.hi - self.lo) + self.lo).reshape(self.chunk, -1)


def closed_loop(policy: MLPPolicy, source: str, episodes: int, seed: int, replan: bool) -> float:
    from data_pipelines.sim import tasks
    from kairos_jax.inference.rollout import control_recorders

    def factory(_rng):
        queue = []

        def act(recorder):
            if not queue:
                chunk = policy(recorder.proprio())
                queue.extend(chunk[:1] if replan else chunk)
            return queue.pop(0)
        return act

    return tasks.success_rate(control_recorders()[source], factory, episodes, seed=seed)["rate"]


def probe(checkpoint: str, heldout: str, source: str, clips: int = 128) -> dict:
    import jax
    import jax.numpy as jnp

    from kairos_jax.inference import evaluate as ev
    from kairos_jax.inference.checkpoints import find_checkpoint, load_config, load_model, load_training_stats
    from kairos_jax.model.diffusion import previous_frames

    ref = find_checkpoint(checkpoint)
    cfg = load_config(ref)
    if not cfg.model.get("proprio_input", False):
        raise SystemExit(f"error: {checkpoint} was trained without model.proprio_input: nothing to probe")
    model = load_model(ref, cfg)
    b = ev.heldout_batch(cfg, heldout, source, clips=clips, num_blocks=cfg.data.num_blocks, seed=0,
                         stats=load_training_stats(ref).get(source))
    video, actions = jnp.asarray(b["video"]), np.asarray(b["actions"])
    dim_mask = jnp.asarray(b["action_dim_mask"])
    B, T = actions.shape[:2]
    # the last block's chunk (known: T > 1), the embodiment's real action dims
    mask = np.broadcast_to(np.asarray(b["action_dim_mask"])[:, None, :], actions[:, -1].shape)
    sigma_video = jnp.zeros((B, T)).at[:, -1].set(1.0)

    def masked_mse(p, q):
        return float(np.sum((p[:, -1] - q[:, -1]) ** 2 * mask) / mask.sum())

    def predict(proprio, present=1.0, seed=0):
        r_a, r_v = jax.random.split(jax.random.key(seed))
        eps = jax.random.normal(r_a, actions.shape) * dim_mask[:, None, None]
        seen = video.at[:, -1].set(jax.random.normal(r_v, video[:, -1].shape))
        state = (previous_frames(jnp.asarray(proprio)), previous_frames(jnp.asarray(b["proprio_mask"])) * present)
        out = model(seen, eps, sigma_video, jnp.ones((B, T)), jnp.asarray(b["embodiment_id"]), dim_mask,
                    jnp.asarray(b["text"]), reference=previous_frames(video), state=state)
        return np.asarray(out.action_x0)

    proprio = np.asarray(b["proprio"])
    negated = proprio.copy()
    negated[..., TASK_DIMS[source]] *= -1
    base = predict(proprio)
    variants = {"state hidden": predict(proprio, present=0.0), "task dims negated": predict(negated),
                "states reversed across clips": predict(proprio[::-1]), "second noise draw": predict(proprio, seed=1)}
    return {"checkpoint": checkpoint, "clips": clips, "x0_mse": masked_mse(base, actions),
            "zero_mse": masked_mse(np.zeros_like(actions), actions),
            "variants": {name: {"x0_mse": masked_mse(p, actions), "change_mse": masked_mse(p, base)}
                         for name, p in variants.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", default="data/small")
    ap.add_argument("--heldout", default="data/heldout")
    ap.add_argument("--sources", default="reacher,pusher")
    ap.add_argument("--chunk", type=int, default=4, help="actions per chunk (the model's data.action_chunk)")
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--episodes", type=int, default=50, help="closed-loop task episodes per source (0: none)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe", default="", help="comma-separated checkpoints to probe")
    ap.add_argument("--json", default="")
    args = ap.parse_args()
    sources = [s for s in args.sources.split(",") if s]
    unknown = [s for s in sources if s not in TASK_DIMS]
    if unknown:
        raise SystemExit(f"error: --sources: {unknown} (known: {sorted(TASK_DIMS)})")
    os.environ.setdefault("MUJOCO_GL", "egl")
    result = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "args": vars(args), "sources": {}}
    t0 = time.time()
    for source in sources:
        train, held = episodes(args.data_root, source), episodes(args.heldout, source)
        if not train or not held:
            raise SystemExit(f"error: {source}: no episodes with actions and proprio under "
                             f"{args.data_root if not train else args.heldout}")
        r = {}
        for name, dims in (("mlp", None), ("mlp_arm_only", slice(0, TASK_DIMS[source].start))):
            x, y = chunks(train, args.chunk, 1, dims)
            policy = MLPPolicy(x, y, args.chunk, steps=args.steps, batch=args.batch, seed=args.seed)
            hx, hy = chunks(held, args.chunk, args.chunk, dims)
            r[name] = {"train_mse": policy.train_mse, "heldout_mse": policy.mse(hx, hy),
                       "zero_mse": float(np.mean((policy.norm_y(np.zeros_like(hy)) - policy.norm_y(hy)) ** 2))}
            if name == "mlp" and args.episodes:
                r[name]["closed_loop_success"] = closed_loop(policy, source, args.episodes, args.seed, replan=False)
                r[name]["closed_loop_success_replanned"] = closed_loop(policy, source, args.episodes, args.seed,
                                                                       replan=True)
            print(source, name, json.dumps(r[name]), flush=True)
        r["probes"] = [probe(c, args.heldout, source) for c in args.probe.split(",") if c]
        for p in r["probes"]:
            print(source, "probe", json.dumps(p), flush=True)
        result["sources"][source] = r
    result["seconds"] = round(time.time() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
