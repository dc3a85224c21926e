"""Two policies on the same closed-loop states: where does the model's policy part from the state
MLP's and from the expert's? (issue #12)

    PYTHONPATH=. python benchmarks/policy_compare.py --checkpoint=runs/X [--source=reacher] \\
        [--episodes=50] [--num_steps=1] [--mlp_steps=1000] [--data_root=data/small] [--json=FILE]

The closed-loop code of the evaluation figures (`kairos_jax.inference.evaluate.model_policy_success`)
runs the task scenes of `kairos_jax.evaluate` (same seed, same scenes) twice: once executing the
model's chunks (driver "model", what the closed-loop figure measures) and once executing the chunks of
benchmarks/state_policy.py's MLP (trained for --mlp_steps on --data_root; driver "mlp"), each chunk
from the live state at the chunk's start, whole, as the model's are. At every control step of both
runs all three policies are asked for the state the driver reached: the model (its chunk from the
frames and states so far, committed as in the evaluation), the MLP, and the scripted expert without
its action noise (the episode's own gains). Reported per driver: success rate; the MSE (raw torque
units) of the model's and the MLP's actions to the expert's, by chunk position along the episode and
by the fingertip's distance to the target; and for the episodes that fail, how close they got and
how many steps they stayed on the target. A policy that matches the expert on the expert's states but
parts from it on its own is what the run driven by the MLP versus the run driven by the model shows.
Only robots with a noise-free expert reference (reacher) are supported.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

DIST_BINS = (0.0, 0.05, 0.1, 0.2, np.inf)     # metres; 0.05 is the target's radius (on target below it)


def noiseless_expert(env) -> np.ndarray:
    """The reacher expert's action at env's state with the episode's gains and no noise."""
    kp, kd, noise = env._gains
    env._gains = kp, kd, 0.0
    try:
        return env.expert_action()
    finally:
        env._gains = kp, kd, noise


def comparing_recorder(recorder_cls, mlp, k: int, driver: str, log: list):
    """`recorder_cls` whose apply executes the driver's action ("model": the action it is given;
    "mlp": the MLP's chunk from the state at each chunk start) and logs, before it, the state's
    distance to the target and the model's, the MLP's and the expert's actions."""

    class Comparing(recorder_cls):
        def reset_task(self, rng) -> None:
            super().reset_task(rng)
            self.t, self.queue, self.trace = 0, [], []
            log.append(self.trace)

        def apply(self, action):
            if self.t % k == 0:
                self.queue = list(np.clip(mlp(self.proprio()), -1.0, 1.0))
            m = self.queue.pop(0)
            self.trace.append({"t": self.t, "dist": self.metric(), "proprio": self.proprio(),
                               "model": np.asarray(action, np.float64),
                               "mlp": np.asarray(m, np.float64), "expert": noiseless_expert(self)})
            self.t += 1
            return super().apply(action if driver == "model" else m)

    Comparing.__name__ = recorder_cls.__name__
    return Comparing


def summarise(traces: list, successes: list, k: int) -> dict:
    """Per-driver figures from the step logs of its episodes (module docstring)."""
    steps = min(len(t) for t in traces)
    arr = lambda key: np.stack([[s[key] for s in t[:steps]] for t in traces])       # [E, T, a]
    dist = np.stack([[s["dist"] for s in t[:steps]] for t in traces])                # [E, T]
    expert, model, mlp = arr("expert"), arr("model"), arr("mlp")
    err = {"model": ((model - expert) ** 2).mean(-1), "mlp": ((mlp - expert) ** 2).mean(-1),
           "model_vs_mlp": ((model - mlp) ** 2).mean(-1)}                           # [E, T]
    out = {"episodes": len(traces), "success_rate": float(np.mean(successes)),
           "mse_to_expert": {n: round(float(e.mean()), 4) for n, e in err.items()},
           "by_chunk": {n: np.round(e[:, :steps // k * k].reshape(len(traces), -1, k).mean((0, 2)), 3).tolist()
                        for n, e in err.items()},
           "by_distance": []}
    for lo, hi in zip(DIST_BINS, DIST_BINS[1:]):
        sel = (dist >= lo) & (dist < hi)
        if sel.any():
            out["by_distance"].append({"metres": [lo, None if np.isinf(hi) else hi],
                                       "share": round(float(sel.mean()), 3),
                                       **{n: round(float(e[sel].mean()), 4) for n, e in err.items()}})
    on = dist < DIST_BINS[1]
    longest = [int(max((len(r) for r in "".join("1" if x else "0" for x in row).split("0")), default=0)) for row in on]
    failed = [i for i, s in enumerate(successes) if not s]
    out["failed"] = {"count": len(failed),
                     "min_distance": np.round(np.sort(dist[failed].min(1)), 3).tolist() if failed else [],
                     "longest_on_target_steps": sorted((longest[i] for i in failed), reverse=True),
                     "final_distance_mean": round(float(dist[failed, -1].mean()), 3) if failed else None}
    out["succeeded_longest_on_target_steps"] = sorted((longest[i] for i, s in enumerate(successes) if s), reverse=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--data_root", default="data/small", help="the MLP's training episodes")
    ap.add_argument("--source", default="reacher")
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--batch", type=int, default=25, help="closed-loop episodes run in lockstep")
    ap.add_argument("--num_steps", type=int, default=1, help="Euler steps of the model (1: the regression mean)")
    ap.add_argument("--mlp_steps", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0, help="the evaluation's seed (the same task scenes)")
    ap.add_argument("--json", default="")
    ap.add_argument("--npz", default="", help="also write every step's log: FILE_<driver>.npz")
    args = ap.parse_args()
    if args.source != "reacher":
        raise SystemExit(f"error: --source={args.source}: only reacher has a noise-free expert reference here")
    os.environ.setdefault("MUJOCO_GL", "egl")

    import state_policy as sp

    from data_pipelines.embodiments import DEFAULT_REGISTRY
    from data_pipelines.normalization import ActionCodec, Normalizer
    from kairos_jax.evaluate import load_engine
    from kairos_jax.inference.checkpoints import load_training_stats
    from kairos_jax.inference.evaluate import model_policy_success
    from kairos_jax.inference.rollout import control_recorders

    t0 = time.time()
    engine, cfg, ref = load_engine(args.checkpoint, args.num_steps)
    recorder_cls = control_recorders()[args.source]
    stats = load_training_stats(ref)[args.source][recorder_cls.embodiment]
    k = cfg.data.action_chunk
    codec = ActionCodec.for_stats(stats, DEFAULT_REGISTRY.get(recorder_cls.embodiment).action_reference,
                                  bool(cfg.data.get("delta_actions", False)))
    x, y = sp.chunks(sp.episodes(args.data_root, args.source), k, 1)
    mlp = sp.MLPPolicy(x, y, k, steps=args.mlp_steps, batch=256, seed=0)
    result = {"machine": f"{platform.node()} ({os.cpu_count()} CPUs)", "args": vars(args), "drivers": {}}
    for driver in ("model", "mlp"):
        log: list = []
        run = model_policy_success(engine, cfg, comparing_recorder(recorder_cls, mlp, k, driver, log), codec,
                                   episodes=args.episodes, batch=args.batch, seed=args.seed,
                                   proprio_norm=Normalizer(stats.proprio))
        result["drivers"][driver] = summarise(log, run["successes"], k)
        if args.npz:
            steps = min(len(t) for t in log)
            np.savez(f"{args.npz}_{driver}.npz", success=np.asarray(run["successes"]),
                     **{key: np.stack([[s[key] for s in t[:steps]] for t in log])
                        for key in ("dist", "proprio", "model", "mlp", "expert")})
        print(driver, json.dumps(result["drivers"][driver]), flush=True)
    result["seconds"] = round(time.time() - t0, 1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
