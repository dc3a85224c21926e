"""The paper's model size (about 4B parameters) over the whole curriculum.

Width 2560, 32 layers, 20 heads, pattern [swa, swa, dswa, gdn] with dilation 4, action expert
width 1024, at the paper's sequence shape (see experiments/sizes.py). Compile it for a TPU slice or a
GPU node without hardware: `python -m kairos_jax.compile --config=experiments/kairos_4b.py --topology=v5p-64`.
"""

from experiments import base, sizes


def get_config(arg: str = ""):
    del arg
    c = base.get_base_config()
    sizes.apply_size(c, "4b")
    c.data.root = "data/converted"
    c.phases.phase1_video.steps = 100_000
    c.phases.phase2_human.steps = 100_000
    c.phases.phase3_robot.steps = 100_000
    c.train.log_every = 50
    c.train.checkpoint_every = 1000
    return c
