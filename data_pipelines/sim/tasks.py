"""Closed-loop task success of the simulated robots (reacher, pusher, cheetah), for evaluating a policy
against the scripted expert that recorded the training data and against random actions.

Each robot recorder has `reset_task(rng)` (a new random scene and the expert's per-episode
parameters), `expert_action()` (the scripted expert of `record`, for the current state), `apply`,
`metric`, `success()` (the task's rule, stated in the robot's module docstring) and `task_steps` (the
control steps a task episode lasts). A policy is a callable `policy(recorder) -> action`, called once
per control step; it may read the recorder's state or its camera (`recorder.frame()`). The rules:

    reacher  the fingertip inside the target (distance < 0.05 m, its radius) for 4 consecutive
             control steps, at any time within 50 steps (2 s); the target does not move
    pusher   the puck's centre on the goal disc (distance < 0.045 m, its radius) for 10 consecutive
             control steps, at any time within 150 steps (6 s)
    cheetah  the mean forward speed over 150 control steps (6 s) above 0.25 m/s

Task episode i of a source is drawn from `task_seed_rng(seed, source, i)`, a seed namespace disjoint
from the training data's `episode_rng(seed, source, i)`, so its initial states are not in the
training data. For a given seed and index every policy faces the same scene; the random policy
draws its actions from a generator spawned from the episode's, which leaves the scene draw as it is.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

import numpy as np

Policy = Callable[[object], np.ndarray]


def task_seed_rng(seed: int, source: str, index: int) -> np.random.Generator:
    """The generator of task episode `index` of `source`: tagged "task/<source>", whereas the
    training data's `episode_rng` is tagged "<source>"."""
    return np.random.default_rng([seed, zlib.crc32(f"task/{source}".encode()), index])


def expert_policy(rng: np.random.Generator) -> Policy:
    """The scripted expert (its noise comes from the task's own generator, passed to reset_task)."""
    return lambda recorder: recorder.expert_action()


def random_policy(rng: np.random.Generator) -> Policy:
    """Actions drawn uniformly in the actuators' control range, independently at every step."""
    def policy(recorder) -> np.ndarray:
        lo, hi = recorder.model.actuator_ctrlrange.T
        return rng.uniform(lo, hi)
    return policy


def run_task_episode(recorder, policy: Policy, rng: np.random.Generator) -> dict:
    """Resets the task from rng and runs `recorder.task_steps` control steps of `policy`.

    Returns success (the recorder's rule after the last step), steps (control steps run) and metric
    (the recorder's task measure `metric_name` before the first step and after each, [steps + 1]).
    """
    recorder.reset_task(rng)
    trace = [recorder.metric()]
    for _ in range(recorder.task_steps):
        recorder.apply(policy(recorder))
        trace.append(recorder.metric())
    return {"success": bool(recorder.success()), "steps": recorder.task_steps, "metric": np.asarray(trace)}


def success_rate(recorder_cls, policy_factory: Callable[[np.random.Generator], Policy], episodes: int,
                 seed: int = 0, image_size: int = 64) -> dict:
    """Runs `episodes` task episodes (indices 0..episodes-1 of `seed`) of `recorder_cls`, each with
    `policy_factory(generator spawned from the episode's)` as its policy.

    Returns rate (the fraction of successes), successes ([episodes] bools) and final_metric (the task
    measure after each episode's last step).
    """
    successes, final = [], []
    with recorder_cls(image_size) as recorder:
        for i in range(episodes):
            rng = task_seed_rng(seed, recorder_cls.source, i)
            result = run_task_episode(recorder, policy_factory(rng.spawn(1)[0]), rng)
            successes.append(result["success"])
            final.append(result["metric"][-1])
    return {"rate": float(np.mean(successes)), "successes": np.asarray(successes),
            "final_metric": np.asarray(final)}
