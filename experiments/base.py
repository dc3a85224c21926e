"""Shared base of every experiment config: model, data, training, mesh and curriculum fields.

Each experiment file calls `base.get_base_config()` and overrides what it changes; any field can be
overridden on the command line, e.g. `--config.train.batch_size=16 --config.model.depth=8`.
"""

import ml_collections

__all__ = ["get_base_config", "phase", "mixture", "modes", "phase1_video", "phase2_human", "phase3_robot",
           "ml_collections"]

# Logical axis -> mesh axes (MaxText-style rules). The only place where model dimensions meet mesh
# axes: parameters and activations carry logical names, this table shards them.
LOGICAL_AXIS_RULES = (
    ("act_batch", ("data", "fsdp")),
    ("act_seq", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("qkv", None),
    ("vocab", None),
    ("patch", None),
    ("action", None),
    ("embodiment", None),
    ("cond", None),
    ("conv", None),
    ("layers", None),
    ("norm", None),
)


def mixture(**weights) -> ml_collections.ConfigDict:
    """A data mixture: source name -> sampling weight."""
    return ml_collections.ConfigDict(dict(weights))


def modes(**weights) -> ml_collections.ConfigDict:
    """Mixture over training modes (DESIGN section 2); missing modes get weight 0."""
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
    c = ml_collections.ConfigDict()
    c.seed = 0

    c.model = ml_collections.ConfigDict(dict(
        video_width=256,          # width of the video expert
        action_width=128,         # width of the action expert (MoT: experts may differ in width)
        depth=8,                  # number of layers; layer l uses pattern[l % len(pattern)]
        num_heads=4,              # shared attention heads of the mixer
        head_dim=64,
        mlp_ratio=4.0,
        pattern=("swa", "swa", "dswa", "gdn"),
        # Rotary embedding of window attention over time and each token's (row, column) in its frame
        # (True), or over time only (False).
        spatial_rope=True,
        window=8,                 # window of SWA/DSWA, counted in blocks
        dilation=4,               # dilation of DSWA
        gdn_conv_size=4,          # short causal depthwise conv on GDN q/k/v
        gdn_chunk_size=64,
        mixer_impl="auto",        # auto | reference | chunked | pallas
        # What the heads predict: "x0" (the clean signal, turned into a velocity for sampling; any
        # width) or "velocity" (eps - x0; needs video_width >= patch_size^2 * channels).
        prediction="x0",
        text_width=128,           # understanding expert (byte-level text transformer)
        text_depth=2,
        text_heads=4,
        cond_dim=256,             # width of the noise-level embedding
        dtype="bfloat16",         # compute dtype
        param_dtype="float32",    # master weights
        scan_layers=True,         # scan over repeats of the layer pattern
        remat="none",             # none | full | dots: activation checkpointing policy
        # PRNG of parameter init: unsafe_rbg / rbg compile fast everywhere (their bits depend on the
        # sharding); threefry2x32 gives the same init on every mesh but compiles slowly on XLA:CPU.
        init_prng="unsafe_rbg",
    ))

    c.data = ml_collections.ConfigDict(dict(
        root="data/embedded",     # folder holding one sub-folder of ArrayRecord shards per source
        image_size=32,            # frame height (and width unless image_width is set)
        image_width=0,            # frame width; 0: square frames (image_size x image_size)
        patch_size=8,             # video tokens: (image_size / patch_size) (width / patch_size) per frame
        channels=3,               # 3 for RGB frames; the latent channels for pre-encoded sources
        num_blocks=8,             # step blocks per clip
        action_chunk=4,           # k: control steps (action tokens) per block; frame stride in a clip
        action_dim=32,            # actions are zero-padded to this size (max over embodiments)
        proprio_dim=32,
        text_len=64,              # task text, as bytes
        num_embodiments=16,       # size of the embodiment embedding table
        worker_count=0,           # Grain multiprocess prefetch workers (0: in-process)
        prefetch=2,
        strict=False,             # bad input: skip and count (False) or raise (True)
    ))

    c.train = ml_collections.ConfigDict(dict(
        batch_size=8,             # global batch size
        grad_accum=1,
        lr=3e-4,
        min_lr_ratio=0.1,
        warmup_steps=50,
        weight_decay=0.05,
        b1=0.9,
        b2=0.95,
        clip_norm=1.0,
        video_loss_weight=1.0,
        action_loss_weight=1.0,
        sigma_sampling="logit_normal",  # logit_normal | uniform
        logit_mean=0.0,
        logit_std=1.0,
        loss_target="x0",         # x0 | velocity: what the loss compares (see diffusion.per_block_errors)
        loss_min_sigma=0.05,      # x0 head with a velocity loss: sigma is clamped here in the 1/sigma^2 weight
        sigma_shift=1.0,          # time shift of sampled sigmas (> 1 favours high noise)
        clean_block_prob=0.25,    # fraction of blocks given clean (diffusion forcing with clean context)
        text_dropout=0.1,         # drop task text (null token only), for classifier-free guidance
        log_every=10,
        # Steps with a non-finite loss or gradient are skipped (no update; counted and logged as
        # skipped_steps); more than this many in one phase stops the run (exit status 3).
        max_skipped_steps=10,
        checkpoint_every=100,
        keep_checkpoints=3,
        async_checkpointing=True,
        measure_peak_flops=True,
        # JAX profiler trace of steps (N, M), inclusive, numbered like the metrics (1 = first step) in
        # every phase: <workdir>/<phase>/profile/process_<i>/ (TensorBoard / XProf). () = off.
        profile_steps=(),
    ))

    # Mesh axes (data, fsdp, tensor, context); -1 fills with the remaining devices.
    c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1, context=1))
    c.logical_axis_rules = LOGICAL_AXIS_RULES

    c.curriculum = ("phase1_video", "phase2_human", "phase3_robot")
    c.phases = ml_collections.ConfigDict({
        "phase1_video": phase1_video(10_000),
        "phase2_human": phase2_human(10_000),
        "phase3_robot": phase3_robot(10_000),
    })
    add_world_action_fields(c)
    return c


def add_world_action_fields(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """World-action model fields (issue 6): text encoder, readout losses, sampling and rollout.
    Validated by `kairos_jax.sampling.validate_world_action_config`."""
    # Understanding expert: "bytes" (built-in byte-level text transformer) or "precomputed"
    # (batch keys text_embedding [B, L, D_ext] + text_embedding_mask [B, L], projected to text_width).
    c.model.text_encoder = "bytes"
    c.model.text_embedding_dim = 0           # D_ext of precomputed embeddings (> 0 when precomputed)
    # Readout heads on the final hidden states, trained where labels exist.
    c.train.proprio_loss_weight = 0.1        # masked by proprio_mask * proprio_dim_mask
    c.train.progress_loss_weight = 0.1       # masked by progress_mask when the batch has one
    c.sampling = ml_collections.ConfigDict(dict(
        num_steps=10,                        # Euler steps from sigma = 1 to 0
        shift=1.0,                           # schedule shift: sigma' = s sigma / (1 + (s - 1) sigma)
        guidance_scale=1.0,                  # classifier-free guidance on the text (1 = conditional only)
    ))
    c.rollout = ml_collections.ConfigDict(dict(
        num_steps=4,                         # Euler steps per streamed block
        context_blocks=2,                    # ground-truth blocks committed before the rollout starts
        full_capacity=64,                    # initial blocks of a "full" layer's cache (doubles when full)
    ))
    return c
