"""The behaviour-cloning baseline of the evaluation harness: the same network and trainer, trained
only as a policy (p(a_t | o_<=t): policy mode, no video loss) on the robot sources alone.

`--config=bc` (or `bc:<size>`, e.g. `bc:embedded`) trains it at the size of the model it is compared
with and for the same number of robot-data steps; `make eval` trains `bc:embedded` into runs/bc and
passes it to `python -m kairos_jax.evaluate --bc_checkpoint=runs/bc`.
"""

from experiments import base, sizes


def get_config(arg: str = "embedded"):
    c = base.get_base_config()
    sizes.apply_size(c, arg or "embedded")
    c.data.root = "data/embedded"
    c.curriculum = ("bc_robot",)
    c.phases = base.ml_collections.ConfigDict({"bc_robot": base.phase(
        steps=1000, mixture_start=base.mixture(reacher=1.0, cheetah=1.0, pusher=1.0),
        mode_mixture=base.modes(policy=1.0))})
    c.train.log_every = 10
    c.train.checkpoint_every = 250
    return c
