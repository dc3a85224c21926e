"""config.train.profile_steps=(N, M) writes a JAX profiler trace of steps N..M."""

import glob
import json
import os

from kairos_jax.training.loop import train_curriculum
from tests.test_train import loop_config


def test_profile_steps_write_a_trace(tiny_data_dir, tmp_path):
    cfg = loop_config(tiny_data_dir)
    cfg.model.update(dict(pattern=("swa",), depth=1))    # the smallest model: this tests the trace only
    cfg.curriculum = ("phase1_video",)
    cfg.phases.phase1_video.steps = 3
    cfg.train.update(dict(profile_steps=(2, 3), checkpoint_every=3))
    train_curriculum(cfg, str(tmp_path))
    traces = glob.glob(os.path.join(tmp_path, "phase1_video", "profile", "process_0", "**", "*.xplane.pb"),
                       recursive=True)
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0, traces
    with open(os.path.join(tmp_path, "phase1_video", "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3]
