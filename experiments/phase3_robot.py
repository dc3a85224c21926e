"""Curriculum phase: robot interaction (video + robot actions + proprio).

One phase on its own; start it from an earlier phase's export with the trainer's curriculum, or
run it alone. The argument picks the model size: `--config=experiments/phase3_robot.py:4b`.
"""

from experiments import base, sizes


def get_config(arg: str = ""):
    c = base.get_base_config()
    sizes.apply_size(c, arg)
    c.curriculum = ("phase3_robot",)
    c.phases = base.ml_collections.ConfigDict({"phase3_robot": base.phase3_robot(100_000)})
    return c
