"""The curriculum every experiment shares: the three phases and their data and mode mixtures, over
the library's config schema (kairos_jax.config.default_config).

Each experiment file calls `base.get_base_config()` and overrides what it changes; any field can be
overridden on the command line, e.g. `--config.train.batch_size=16 --config.model.depth=8`.
"""

import ml_collections

from kairos_jax.config import default_config

__all__ = ["get_base_config", "phase", "mixture", "modes", "phase1_video", "phase2_human", "phase3_robot",
           "ml_collections"]


def mixture(**weights) -> ml_collections.ConfigDict:
    """A data mixture: source name -> sampling weight."""
    return ml_collections.ConfigDict(dict(weights))


def modes(**weights) -> ml_collections.ConfigDict:
    """Mixture over training modes (docs/architecture.md §2); missing modes get weight 0."""
    m = {"joint": 0.0, "policy": 0.0, "forward_dynamics": 0.0, "inverse_dynamics": 0.0,
         "video_prediction": 0.0}
    m.update(weights)
    return ml_collections.ConfigDict(m)


def phase(*, steps: int, mixture_start: ml_collections.ConfigDict,
          mixture_end: ml_collections.ConfigDict | None = None,
          mode_mixture: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """One curriculum phase. Weights move linearly from mixture_start to mixture_end over `steps`."""
    return ml_collections.ConfigDict({
        "steps": steps,
        "mixture": mixture_start,
        # Same keys as `mixture`; empty means the weights stay constant over the phase.
        "mixture_end": mixture_end if mixture_end is not None else ml_collections.ConfigDict(),
        "modes": mode_mixture,
    })


def phase1_video(steps: int) -> ml_collections.ConfigDict:
    """Open-world video (action-free): learn how the world moves."""
    return phase(steps=steps, mixture_start=mixture(passive_video=1.0),
                 mode_mixture=modes(video_prediction=0.7, joint=0.3))


def phase2_human(steps: int) -> ml_collections.ConfigDict:
    """Human behaviour: video + keypoint actions + task text, video weight fading out."""
    return phase(steps=steps, mixture_start=mixture(passive_video=0.3, human=0.7),
                 mixture_end=mixture(passive_video=0.1, human=0.9),
                 mode_mixture=modes(joint=0.3, video_prediction=0.2, forward_dynamics=0.2, policy=0.15,
                                    inverse_dynamics=0.15))


def phase3_robot(steps: int) -> ml_collections.ConfigDict:
    """Robot interaction: three embodiments with video + actions + proprio, replaying earlier data."""
    return phase(steps=steps,
                 mixture_start=mixture(passive_video=0.1, human=0.2, reacher=0.25, cheetah=0.2, pusher=0.25),
                 mode_mixture=modes(joint=0.2, video_prediction=0.1, forward_dynamics=0.25, policy=0.3,
                                    inverse_dynamics=0.15))


def get_base_config() -> ml_collections.ConfigDict:
    """The schema's defaults with the three-phase curriculum (10k steps each)."""
    c = default_config()
    # The robot's proprio state is an input of the policy (model.proprio_input; docs/architecture.md
    # §2): on eval_small it lowered the policy's action MSE on every robot (benchmarks/RESULTS.md).
    c.model.proprio_input = True
    c.curriculum = ("phase1_video", "phase2_human", "phase3_robot")
    c.phases = ml_collections.ConfigDict({
        "phase1_video": phase1_video(10_000),
        "phase2_human": phase2_human(10_000),
        "phase3_robot": phase3_robot(10_000),
    })
    return c
