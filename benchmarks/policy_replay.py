"""The closed-loop harness fed with recorded episodes: does the closed loop ask a policy what the
open-loop figures ask it, and where along an episode does it err? (issue #12)

    PYTHONPATH=. python benchmarks/policy_replay.py --checkpoint=runs/X [--heldout=data/heldout] \\
        [--source=reacher] [--episodes=20] [--num_steps=1] [--mlp_steps=1000] [--data_root=data/small]

`kairos_jax.inference.evaluate.model_policy_success`, the code of the closed-loop figures, drives a
stand-in for the simulator that plays back the first `task_steps` (rounded down to whole chunks)
of `--episodes` held-out episodes: its frame and state are the recording's whatever the policy does,
and each executed action is paired with the recorded one. Reported, in raw action units: the MSE of
the executed chunks to the recorded actions, per chunk position along the episode, beside the same
for zero actions and, with --mlp_steps > 0, for benchmarks/state_policy.py's MLP trained for that
many steps on --data_root (its chunks from the recorded state at each chunk start).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def replay_recorder(recorder_cls, episodes: list, steps: int, log: list):
    """A recorder class with `recorder_cls`'s names that plays `episodes` back in order (one per
    reset_task) and appends (executed action, recorded action) to `log` at every apply."""

    class Replay:
        source, embodiment, task_steps = recorder_cls.source, recorder_cls.embodiment, steps
        control_text = recorder_cls.control_text
        next_episode = 0

        def __init__(self, image_size: int):
            del image_size

        def reset_task(self, rng) -> None:
            del rng
            self.ep, self.t = episodes[Replay.next_episode], 0
            Replay.next_episode += 1

        def frame(self) -> np.ndarray:
            return self.ep.frames[self.t]

        def proprio(self) -> np.ndarray:
            return self.ep.proprio[self.t].astype(np.float64)

        def apply(self, action) -> None:
            log.append((np.asarray(action, np.float64), self.ep.actions[self.t].astype(np.float64)))
            self.t += 1

        def success(self) -> bool:
            return False

        def metric(self) -> float:
            return 0.0

        def close(self) -> None:
            pass

    return Replay


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--heldout", default="data/heldout")
    ap.add_argument("--data_root", default="data/small", help="the MLP's training episodes")
    ap.add_argument("--source", default="reacher")
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--num_steps", type=int, default=1, help="Euler steps (1: the regression mean)")
    ap.add_argument("--mlp_steps", type=int, default=1000, help="0: no MLP")
    args = ap.parse_args()

    import state_policy as sp

    from data_pipelines.embodiments import DEFAULT_REGISTRY
    from data_pipelines.normalization import ActionCodec, Normalizer
    from kairos_jax.evaluate import load_engine
    from kairos_jax.inference.checkpoints import load_training_stats
    from kairos_jax.inference.evaluate import model_policy_success
    from kairos_jax.inference.rollout import control_recorders

    engine, cfg, ref = load_engine(args.checkpoint, args.num_steps)
    recorder_cls = control_recorders()[args.source]
    stats = load_training_stats(ref)[args.source][recorder_cls.embodiment]
    k = cfg.data.action_chunk
    steps = recorder_cls.task_steps // k * k
    eps = [ep for ep in sp.episodes(args.heldout, args.source) if ep.num_frames > steps][:args.episodes]
    log: list = []
    codec = ActionCodec.for_stats(stats, DEFAULT_REGISTRY.get(recorder_cls.embodiment).action_reference,
                                  bool(cfg.data.get("delta_actions", False)))
    model_policy_success(engine, cfg, replay_recorder(recorder_cls, eps, steps, log), codec, episodes=len(eps),
                         batch=len(eps), seed=0, proprio_norm=Normalizer(stats.proprio))
    n = len(eps)
    # the log is step-major (all episodes in lockstep): [steps, episodes, A]
    pred = np.stack([p for p, _ in log]).reshape(steps, n, -1)
    true = np.stack([t for _, t in log]).reshape(steps, n, -1)
    per_chunk = lambda x: np.round(((x - true) ** 2).reshape(steps // k, -1).mean(1), 4).tolist()
    out = {"checkpoint": args.checkpoint, "source": args.source, "episodes": n, "steps": steps,
           "num_steps": args.num_steps, "model_mse": float(np.mean((pred - true) ** 2)),
           "zero_mse": float(np.mean(true ** 2)), "model_by_chunk": per_chunk(pred),
           "zero_by_chunk": per_chunk(np.zeros_like(true))}
    if args.mlp_steps:
        x, y = sp.chunks(sp.episodes(args.data_root, args.source), k, 1)
        mlp = sp.MLPPolicy(x, y, k, steps=args.mlp_steps, batch=256, seed=0)
        m = np.stack([np.concatenate([mlp(ep.proprio[s]) for s in range(0, steps, k)]) for ep in eps], 1)
        out |= {"mlp_steps": args.mlp_steps, "mlp_mse": float(np.mean((m - true) ** 2)), "mlp_by_chunk": per_chunk(m)}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
