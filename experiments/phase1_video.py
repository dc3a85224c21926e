"""Curriculum phase: open-world video (action-free).

One phase on its own; start it from an earlier phase's export with the trainer's curriculum, or
run it alone. The argument picks the model size: `--config=experiments/phase1_video.py:4b`.
"""

from experiments import base, sizes


def get_config(arg: str = ""):
    c = base.get_base_config()
    sizes.apply_size(c, arg)
    c.curriculum = ("phase1_video",)
    c.phases = base.ml_collections.ConfigDict({"phase1_video": base.phase1_video(100_000)})
    return c
