"""The embedded default: the whole curriculum (video -> human -> robot) on a 2-core CPU.

`make train` runs this on the MuJoCo data that `make data` generates in data/embedded.
"""

from experiments import base, sizes


def get_config(arg: str = ""):
    del arg
    c = base.get_base_config()
    sizes.apply_size(c, "embedded")
    c.data.root = "data/embedded"
    c.phases.phase1_video.steps = 300
    c.phases.phase2_human.steps = 300
    c.phases.phase3_robot.steps = 400
    c.train.log_every = 10
    c.train.checkpoint_every = 50
    # held-out one-block-ahead PSNR (vs copy-last-frame) and loss in the metrics every 100 steps
    c.eval.every = 100
    c.eval.root = "data/heldout"
    return c
