"""Curriculum phase: human behaviour (video + keypoint actions).

One phase on its own; start it from an earlier phase's export with the trainer's curriculum, or
run it alone. The argument picks the model size: `--config=experiments/phase2_human.py:4b`.
"""

from experiments import base, sizes


def get_config(arg: str = ""):
    c = base.get_base_config()
    sizes.apply_size(c, arg)
    c.curriculum = ("phase2_human",)
    c.phases = base.ml_collections.ConfigDict({"phase2_human": base.phase2_human(100_000)})
    return c
