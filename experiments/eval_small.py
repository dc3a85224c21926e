"""A config that learns on this machine: the embedded model over the whole curriculum for 7,000
steps (about an hour on 2 free cores), on 4x the embedded data (`python -m data_pipelines.generate
--preset=small --output=data/small`), with held-out metrics every 500 steps. The figures it reaches
are in benchmarks/RESULTS.md ("World model quality").

Arguments (`--config=eval_small:<arg>`):
  ""           the curriculum: video 2,000 -> human 2,000 -> robot 3,000 steps
  robot_only   the same 7,000 steps on the robot phase's mixture alone (the curriculum ablation)
  Either with ",state" appended (e.g. `robot_only,state`, or `state` alone for the curriculum): the
  robot's proprio state is an input of the action tokens (model.proprio_input), as a policy is
  usually conditioned; and with ",delta": joint-target actions (the pusher's) are learned relative
  to the state where their chunk starts (data.delta_actions).
"""

from experiments import base, sizes


def get_config(arg: str = ""):
    parts = [p for p in arg.split(",") if p]
    state, delta = "state" in parts, "delta" in parts
    arg = ",".join(p for p in parts if p not in ("state", "delta"))
    c = base.get_base_config()
    c.model.proprio_input = state
    c.data.delta_actions = delta
    sizes.apply_size(c, "embedded")
    c.data.root = "data/small"
    c.train.update(dict(lr=3e-3, warmup_steps=100, log_every=50, checkpoint_every=500))
    c.eval.update(dict(every=500, root="data/heldout"))
    if arg == "":
        c.phases.phase1_video.steps = 2000
        c.phases.phase2_human.steps = 2000
        c.phases.phase3_robot.steps = 3000
    elif arg == "robot_only":
        c.curriculum = ("phase3_robot",)
        c.phases = base.ml_collections.ConfigDict({"phase3_robot": base.phase3_robot(7_000)})
    else:
        raise ValueError(f"eval_small: unknown argument {arg!r} (one of '', 'robot_only', each optionally "
                         f"with ',state' and ',delta')")
    return c
