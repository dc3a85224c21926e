"""benchmarks/policy_compare.py: two policies asked on the same closed-loop states (issue #12)."""

import numpy as np
import pytest

from benchmarks.policy_compare import comparing_recorder, summarise


class FakeReacher:
    """A point that moves by the applied action; the target at the origin."""

    def __init__(self, image_size):
        del image_size
        self.applied = []

    def reset_task(self, rng):
        self.pos = np.array([0.3, 0.0])
        self._gains = (2.0, 0.1, 0.5)

    def proprio(self):
        return self.pos.copy()

    def metric(self):
        return float(np.linalg.norm(self.pos))

    def expert_action(self):
        noise = self._gains[2]
        return -self.pos + noise      # the noise term must be switched off for the reference

    def apply(self, action):
        self.applied.append(np.asarray(action))
        self.pos = self.pos + 0.5 * np.asarray(action)


@pytest.mark.parametrize("driver", ["model", "mlp"])
def test_the_driver_acts_and_all_three_policies_are_logged_at_its_states(driver):
    log = []
    mlp = lambda state: np.stack([-state, -state * 0.5])                       # a chunk of 2
    env = comparing_recorder(FakeReacher, mlp, 2, driver, log)(64)
    env.reset_task(None)
    model_action = np.array([0.1, 0.1])
    for _ in range(3):
        env.apply(model_action)
    trace = log[0]
    assert [s["t"] for s in trace] == [0, 1, 2]
    # the MLP's chunk is asked at chunk starts (t = 0, 2) from the state reached there
    np.testing.assert_allclose(trace[0]["mlp"], [-0.3, 0.0])
    np.testing.assert_allclose(trace[1]["mlp"], [-0.15, 0.0])
    np.testing.assert_allclose(trace[2]["mlp"], np.clip(-trace[2]["proprio"], -1, 1))
    for s in trace:
        np.testing.assert_allclose(s["expert"], -s["proprio"])                  # noiseless
        np.testing.assert_allclose(s["model"], model_action)
    executed = [s["model"] if driver == "model" else s["mlp"] for s in trace]
    np.testing.assert_allclose(np.stack(env.applied), np.stack(executed))
    assert env._gains == (2.0, 0.1, 0.5)                                      # restored


def test_summary_bins_errors_by_distance_and_counts_runs_on_target():
    step = lambda d, model, mlp, expert: {"dist": d, "model": np.array([model]), "mlp": np.array([mlp]),
                                          "expert": np.array([expert])}
    # episode 0 succeeds (3 steps on target in a row), episode 1 fails (never closer than 0.08 m)
    ep0 = [step(0.3, 1.0, 0.0, 0.0), step(0.04, 0.0, 0.0, 0.0), step(0.03, 0.0, 0.0, 0.0), step(0.02, 0.0, 0.0, 0.0)]
    ep1 = [step(0.3, 0.0, 0.0, 0.0), step(0.2, 2.0, 0.0, 0.0), step(0.08, 0.0, 1.0, 0.0), step(0.15, 0.0, 0.0, 0.0)]
    out = summarise([ep0, ep1], [True, False], k=2)
    assert out["success_rate"] == 0.5
    assert out["mse_to_expert"] == {"model": round((1 + 4) / 8, 4), "mlp": round(1 / 8, 4),
                                    "model_vs_mlp": round((1 + 4 + 1) / 8, 4)}
    assert out["by_chunk"]["model"] == [round((1 + 0 + 0 + 4) / 4, 3), 0.0]
    bins = {tuple(b["metres"]): b for b in out["by_distance"]}
    assert bins[(0.0, 0.05)]["share"] == round(3 / 8, 3) and bins[(0.0, 0.05)]["model"] == 0.0
    assert bins[(0.05, 0.1)]["mlp"] == 1.0
    assert bins[(0.2, None)]["model"] == round(5 / 3, 4)                       # 0.3, 0.3, 0.2 m: 1, 0, 4
    assert out["failed"] == {"count": 1, "min_distance": [0.08], "longest_on_target_steps": [0],
                             "final_distance_mean": 0.15}
    assert out["succeeded_longest_on_target_steps"] == [3]
