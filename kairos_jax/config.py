"""The config schema and its one validation layer.

`default_config()` is every field the library reads, with its default and a comment; experiment
files (`experiments/`) start from it, add a curriculum and override what they change. `validate`
checks a whole config before anything compiles and raises `ConfigError` (the one error type of
config validation, shared with data_pipelines) naming the field, its value and what is allowed;
every command-line entry point turns it into exit status 2 (kairos_jax.cli).
`load_saved_config` reads the config.json a training run wrote.
"""

from __future__ import annotations

import os
import uuid

import ml_collections

from data_pipelines import storage
from data_pipelines.pipeline import ConfigError, check_tokenizer, clip_spec
from kairos_jax.inference.streaming import POLICY_HISTORIES
from kairos_jax.model.diffusion import LOSS_TARGETS, MODES, SIGMA_SAMPLERS
from kairos_jax.model.mixers import MIXERS
from kairos_jax.model.world_model import PREDICTIONS, REMAT_POLICIES, TEXT_ENCODERS
from kairos_jax.parallel.sharding import DEFAULT_LOGICAL_AXIS_RULES, MESH_AXES

__all__ = ["ConfigError", "default_config", "validate", "check_data_sources", "check_workdir",
           "load_saved_config"]

IMPLS = ("auto", "reference", "chunked", "pallas")
DTYPES = ("float32", "bfloat16")
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


def default_config() -> ml_collections.ConfigDict:
    """Every field with its default, and no curriculum (`curriculum` = (), `phases` empty): an
    experiment adds its phases (experiments/base.py)."""
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
        # x0 head: the video head predicts the change from each block's previous clean frame (the
        # recorded one in training, the committed one in a rollout); "nothing moved" is its zero output.
        video_residual=True,
        # The robot's state (proprio, normalised) where each block's action chunk starts is an input
        # of the block's action tokens (a learned "absent" vector where it is not known).
        proprio_input=False,
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
        # "": the model sees pixel frames. Else the folder of the video tokenizer (kairos_jax.tokenizer) the
        # sources were encoded with (`python -m data_pipelines.convert --encoder=tokenizer:DIR`): the model
        # trains on its normalised latents (channels = its latent channels, image_size x image_width = the
        # latent frame size, action_chunk a multiple of its temporal stride), and rollout, evaluation and
        # serving decode them to frames with it (data_pipelines/latents.py).
        tokenizer="",
        num_blocks=8,             # step blocks per clip
        action_chunk=4,           # k: control steps (action tokens) per block; frame stride in a clip
        action_dim=32,            # actions are zero-padded to this size (max over embodiments)
        proprio_dim=32,
        text_len=64,              # task text: bytes, or rows (tokens) of precomputed text embeddings
        # D of the precomputed text embeddings every clip carries (data_pipelines/text_embeddings.py), looked
        # up by the episode's text in its source's table; 0: none. Equals model.text_embedding_dim with
        # model.text_encoder='precomputed', else 0 (validate checks).
        text_embedding_dim=0,
        # share of training clips that start at their episode's first frame (else uniform starts): the
        # state every closed-loop episode starts from, block 0 of few clips otherwise
        episode_start_prob=0.0,
        num_embodiments=16,       # size of the embodiment embedding table
        # joint-target actions (Embodiment.action_reference) learned relative to the state where
        # their chunk starts, with their own statistics (data_pipelines.normalization.ActionCodec)
        delta_actions=False,
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
        # Residual video head: each block's reference (previous recorded) frame gets Gaussian noise of
        # a std drawn per block from U(0, reference_noise), so the head learns to correct a wrong
        # reference from the history, as it must when a rollout's reference is its own last frame.
        reference_noise=0.0,
        # model.proprio_input: the fraction of blocks whose state input is hidden in training (shown
        # as absent), so the model also predicts without one (a generated frame has no state).
        proprio_input_dropout=0.25,
        # Policy-mode examples whose every action chunk is given absent (sigma = 1), so that the
        # policy must act from the state and the frames, not by continuing its own past chunks (the
        # "copycat" shortcut of behaviour cloning with action histories). Pair with
        # rollout.policy_history="absent".
        action_history_dropout=0.0,
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
    c.logical_axis_rules = DEFAULT_LOGICAL_AXIS_RULES

    # Understanding expert: "bytes" (built-in byte-level text transformer) or "precomputed"
    # (batch keys text_embedding [B, L, D_ext] + text_embedding_mask [B, L], projected to text_width;
    # stored per source by `data_pipelines.convert --text_encoder` / `data_pipelines.text_embed`, and
    # carried by the clips when data.text_embedding_dim = D_ext).
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
        context_sigma=0.0,                   # generated video enters the history re-noised to this level
        # What a policy loop (closed loop, served policy) commits with each new frame: "actions" (the
        # chunk it sent, clean) or "absent" (noise at sigma = 1: the policy conditions on states and
        # frames only; for models trained with train.action_history_dropout)
        policy_history="actions",
    ))
    # Held-out evaluation during training (kairos_jax.inference.evaluate.heldout_metrics): every
    # `every` steps of every phase, on a fixed batch of clips of the phase's robot sources under `root`.
    c.eval = ml_collections.ConfigDict(dict(
        every=0,                             # 0: off
        root="",                             # held-out data root ("" = off), e.g. data/heldout
        clips_per_source=8,
        num_steps=4,                         # Euler steps of the one-block-ahead prediction
    ))
    # The curriculum: phase names in order, and per phase its steps, data mixture and mode mixture
    # (experiments/base.py `phase`).
    c.curriculum = ()
    c.phases = ml_collections.ConfigDict()
    return c


def _req(cond: bool, field: str, value, allowed: str):
    if not cond:
        raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")


def _positive_int(cfg, section: str, name: str, minimum: int = 1):
    v = cfg[section][name]
    _req(isinstance(v, int) and not isinstance(v, bool) and v >= minimum, f"{section}.{name}", v,
         f"must be an integer >= {minimum}")


def validate(cfg) -> None:
    """Raise ConfigError on the first invalid field."""
    for section in ("model", "data", "train", "mesh", "phases"):
        if section not in cfg:
            raise ConfigError(f"config.{section} is missing")
    m, d, t = cfg.model, cfg.data, cfg.train

    # model
    for name in ("video_width", "action_width", "depth", "num_heads", "head_dim", "window", "dilation",
                 "gdn_conv_size", "gdn_chunk_size", "text_width", "text_depth", "text_heads", "cond_dim"):
        _positive_int(cfg, "model", name, minimum=0 if name == "text_depth" else 1)
    pattern = tuple(m.pattern)
    _req(len(pattern) > 0 and all(p in MIXERS for p in pattern), "model.pattern", pattern,
         f"a non-empty sequence of {MIXERS}")
    if m.scan_layers:
        _req(m.depth % len(pattern) == 0, "model.depth", m.depth,
             f"with model.scan_layers=True must be a multiple of len(model.pattern)={len(pattern)} "
             "(or set model.scan_layers=False)")
    _req(m.head_dim % 2 == 0, "model.head_dim", m.head_dim, "must be even (rotary embedding)")
    _req(m.text_width % m.text_heads == 0, "model.text_width", m.text_width,
         f"must be divisible by model.text_heads={m.text_heads}")
    _req(m.cond_dim % 2 == 0, "model.cond_dim", m.cond_dim, "must be even (sinusoidal embedding)")
    _req(m.mixer_impl in IMPLS, "model.mixer_impl", m.mixer_impl, f"one of {IMPLS}")
    _req(m.dtype in DTYPES, "model.dtype", m.dtype, f"one of {DTYPES}")
    _req(m.param_dtype in DTYPES, "model.param_dtype", m.param_dtype, f"one of {DTYPES}")
    _req(m.remat in REMAT_POLICIES, "model.remat", m.remat, f"one of {tuple(REMAT_POLICIES)}")
    _req(m.init_prng in PRNG_IMPLS, "model.init_prng", m.init_prng, f"one of {PRNG_IMPLS}")
    _req(m.mlp_ratio > 0, "model.mlp_ratio", m.mlp_ratio, "must be > 0")
    _req(m.prediction in PREDICTIONS, "model.prediction", m.prediction, f"one of {PREDICTIONS}")
    _req(isinstance(m.spatial_rope, bool), "model.spatial_rope", m.spatial_rope, "True or False")
    _req(isinstance(m.video_residual, bool), "model.video_residual", m.video_residual, "True or False")
    _req(not m.video_residual or m.prediction == "x0", "model.video_residual", m.video_residual,
         "True needs model.prediction='x0' (the residual is added to the clean-signal estimate)")
    _req(isinstance(m.proprio_input, bool), "model.proprio_input", m.proprio_input, "True or False")

    # data: the clip geometry is checked by the pipeline that cuts the clips
    clip_spec(d)
    _positive_int(cfg, "data", "num_embodiments")
    _positive_int(cfg, "data", "worker_count", minimum=0)
    _req(isinstance(d.root, str) and d.root != "", "data.root", d.root, "a directory path")
    if m.prediction == "velocity":
        # A velocity (eps - x0) carries every dimension of the noise: a token path narrower than the
        # values it must reproduce cannot learn it (the model then predicts noise; see model.prediction).
        patch_values = d.patch_size ** 2 * d.channels
        _req(m.video_width >= patch_values, "model.video_width", m.video_width,
             f"with model.prediction='velocity' must be >= the values of one patch (data.patch_size^2 * "
             f"data.channels = {patch_values}); use model.prediction='x0' for a narrower model")
        _req(m.action_width >= d.action_dim, "model.action_width", m.action_width,
             f"with model.prediction='velocity' must be >= data.action_dim={d.action_dim}; use "
             "model.prediction='x0' for a narrower action expert")

    # train
    _positive_int(cfg, "train", "batch_size")
    _positive_int(cfg, "train", "grad_accum")
    _req(t.batch_size % t.grad_accum == 0, "train.batch_size", t.batch_size,
         f"must be a multiple of train.grad_accum={t.grad_accum}")
    for name in ("lr", "clip_norm", "sigma_shift"):
        _req(t[name] > 0, f"train.{name}", t[name], "must be > 0")
    for name in ("min_lr_ratio", "clean_block_prob", "text_dropout", "action_history_dropout"):
        _req(0.0 <= t[name] <= 1.0, f"train.{name}", t[name], "must be in [0, 1]")
    _req(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0, "train.b1/b2", (t.b1, t.b2), "must be in [0, 1)")
    _req(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    _req(t.sigma_sampling in SIGMA_SAMPLERS, "train.sigma_sampling", t.sigma_sampling,
         f"one of {SIGMA_SAMPLERS}")
    _req(t.logit_std > 0, "train.logit_std", t.logit_std, "must be > 0")
    _req(t.loss_target in LOSS_TARGETS, "train.loss_target", t.loss_target, f"one of {LOSS_TARGETS}")
    _req(0.0 < t.loss_min_sigma <= 1.0, "train.loss_min_sigma", t.loss_min_sigma, "must be in (0, 1]")
    _req(0.0 <= t.proprio_input_dropout <= 1.0, "train.proprio_input_dropout", t.proprio_input_dropout,
         "must be in [0, 1]")
    _req(0.0 <= t.reference_noise <= 2.0, "train.reference_noise", t.reference_noise,
         "must be in [0, 2] (a std in [-1, 1] token units)")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        _positive_int(cfg, "train", name)
    _positive_int(cfg, "train", "warmup_steps", minimum=0)
    _positive_int(cfg, "train", "max_skipped_steps", minimum=0)
    prof = t.get("profile_steps", ())
    _req(isinstance(prof, (tuple, list)) and (len(prof) == 0 or (
        len(prof) == 2 and all(isinstance(s, int) and not isinstance(s, bool) for s in prof)
        and 1 <= prof[0] <= prof[1])), "train.profile_steps", prof,
         "() (off) or (first, last) step numbers with 1 <= first <= last")

    # mesh
    for a in MESH_AXES:
        v = cfg.mesh.get(a)
        _req(isinstance(v, int) and (v == -1 or v >= 1), f"mesh.{a}", v, "a positive integer or -1")
    _req(sum(cfg.mesh[a] == -1 for a in MESH_AXES) <= 1, "mesh", dict(cfg.mesh), "at most one axis -1")

    # curriculum
    curriculum = tuple(cfg.curriculum)
    _req(len(curriculum) > 0, "curriculum", curriculum, "a non-empty sequence of phase names")
    for name in curriculum:
        _req(name in cfg.phases, "curriculum", curriculum,
             f"every name must be a key of config.phases ({sorted(cfg.phases)})")
        p = cfg.phases[name]
        f = f"phases.{name}"
        _req(isinstance(p.steps, int) and p.steps >= 1, f"{f}.steps", p.steps, "an integer >= 1")
        _req(len(p.mixture) > 0, f"{f}.mixture", dict(p.mixture), "at least one source with a weight")
        _req(all(w >= 0 for w in p.mixture.values()) and sum(p.mixture.values()) > 0, f"{f}.mixture",
             dict(p.mixture), "weights must be >= 0 and not all zero")
        if len(p.mixture_end):
            _req(set(p.mixture_end) == set(p.mixture), f"{f}.mixture_end", dict(p.mixture_end),
                 f"must have the same sources as mixture ({sorted(p.mixture)}) or be empty")
            _req(all(w >= 0 for w in p.mixture_end.values()) and sum(p.mixture_end.values()) > 0,
                 f"{f}.mixture_end", dict(p.mixture_end), "weights must be >= 0 and not all zero")
        unknown = set(p.modes) - set(MODES)
        _req(not unknown, f"{f}.modes", sorted(unknown), f"mode names must be among {MODES}")
        _req(all(w >= 0 for w in p.modes.values()) and sum(p.modes.values()) > 0, f"{f}.modes",
             dict(p.modes), "weights must be >= 0 and not all zero")
    _validate_world_action(cfg)
    _validate_eval(cfg)


def check_data_sources(cfg) -> None:
    """Every source a phase names must be a folder under data.root, the held-out root of
    eval.every must exist, and data.tokenizer (when set) must be a tokenizer folder that fits the
    data config (checked before compiling)."""
    check_tokenizer(clip_spec(cfg.data))
    if cfg.eval.every and not storage.isdir(cfg.eval.root):
        raise ConfigError(f"config.eval.root={cfg.eval.root!r}: directory does not exist (held-out episodes: "
                          f"`make data` writes data/heldout; or set config.eval.every=0)")
    root = cfg.data.root
    if not storage.isdir(root):
        raise ConfigError(f"config.data.root={root!r}: directory does not exist "
                          "(generate local data with `make data` or point data.root at your converted shards)")
    present = sorted(e for e in storage.listdir(root) if storage.isdir(storage.join(root, e)))
    for name in cfg.curriculum:
        for source in cfg.phases[name].mixture:
            if source not in present:
                raise ConfigError(f"config.phases.{name}.mixture names source {source!r}, but "
                                  f"{storage.join(root, source)} does not exist; sources under {root}: "
                                  f"{present}")


# Where a workdir may be: Orbax writes the checkpoints' arrays through TensorStore, whose kvstore it
# builds for local paths ("file") and gs:// URLs ("gcs") only; an s3:// path fails in Orbax itself.
WORKDIR_SCHEMES = ("", "gs")


def check_workdir(workdir: str) -> None:
    """The workdir (a local path or a gs:// URL, data_pipelines.storage) must be creatable and writable."""
    if storage.scheme(workdir) not in WORKDIR_SCHEMES:
        raise ConfigError(f"--workdir={workdir!r}: checkpoints (Orbax, through TensorStore) are written to local "
                          f"paths and gs:// URLs only, not {storage.scheme(workdir)}://; use a gs:// bucket or a "
                          f"local (or mounted) folder")
    try:
        storage.makedirs(workdir)
    except (OSError, ValueError, ImportError) as e:   # ImportError: no fsspec backend (gcsfs) for the URL
        raise ConfigError(f"--workdir={workdir!r} cannot be created: {_reason(e)}") from None
    # A probe file of this process's own: every process of a multi-process run checks the same
    # (shared) workdir at once, and one shared name raced (one process removed another's probe).
    probe = storage.join(workdir, f".write_test.{os.getpid()}.{uuid.uuid4().hex}")
    try:
        with storage.open(probe, "wb") as f:
            f.write(b"ok")
        storage.remove(probe)
    except (OSError, ValueError) as e:
        raise ConfigError(f"--workdir={workdir!r} is not writable: {_reason(e)}") from None


def _reason(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"


def _validate_world_action(cfg) -> None:
    """Text encoder, readout, sampling and rollout fields."""
    def req(cond, field, value, allowed):
        if not cond:
            raise ConfigError(f"config.{field}={value!r} is invalid: {allowed}")

    def integer(v, minimum):
        return isinstance(v, int) and not isinstance(v, bool) and v >= minimum

    m, t = cfg.model, cfg.train
    req(m.text_encoder in TEXT_ENCODERS, "model.text_encoder", m.text_encoder, f"one of {TEXT_ENCODERS}")
    d_text = cfg.data.get("text_embedding_dim", 0)
    if m.text_encoder == "precomputed":
        req(integer(m.text_embedding_dim, 1), "model.text_embedding_dim", m.text_embedding_dim,
            "an integer >= 1 (the feature size of the stored text embeddings) with text_encoder='precomputed'")
        req(d_text == m.text_embedding_dim, "data.text_embedding_dim", d_text,
            f"with model.text_encoder='precomputed' it must equal model.text_embedding_dim={m.text_embedding_dim} "
            f"(the clips then carry each source's stored text embeddings)")
    else:
        req(d_text == 0, "data.text_embedding_dim", d_text,
            f"must be 0 with model.text_encoder={m.text_encoder!r}, which reads byte text (set "
            f"model.text_encoder='precomputed' and model.text_embedding_dim={d_text} to read the embeddings)")
    for name in ("proprio_loss_weight", "progress_loss_weight"):
        req(isinstance(t[name], int | float) and t[name] >= 0, f"train.{name}", t[name], "a number >= 0")
    s = cfg.sampling
    req(integer(s.num_steps, 1), "sampling.num_steps", s.num_steps, "an integer >= 1")
    req(isinstance(s.shift, int | float) and s.shift > 0, "sampling.shift", s.shift, "a number > 0")
    req(isinstance(s.guidance_scale, int | float) and s.guidance_scale >= 0, "sampling.guidance_scale",
        s.guidance_scale, "a number >= 0 (1 = conditional only)")
    r = cfg.rollout
    req(integer(r.num_steps, 1), "rollout.num_steps", r.num_steps, "an integer >= 1")
    req(integer(r.context_blocks, 1), "rollout.context_blocks", r.context_blocks, "an integer >= 1")
    req(integer(r.full_capacity, 1), "rollout.full_capacity", r.full_capacity, "an integer >= 1")
    req(isinstance(r.context_sigma, (int, float)) and 0.0 <= r.context_sigma < 1.0, "rollout.context_sigma",
        r.context_sigma, "a number in [0, 1)")
    req(r.policy_history in POLICY_HISTORIES, "rollout.policy_history", r.policy_history, f"one of {POLICY_HISTORIES}")

def _validate_eval(cfg) -> None:
    e = cfg.eval
    _req(isinstance(e.every, int) and not isinstance(e.every, bool) and e.every >= 0, "eval.every", e.every,
         "an integer >= 0 (0 = off)")
    _req(isinstance(e.root, str), "eval.root", e.root, "a directory path, or '' for none")
    _positive_int(cfg, "eval", "clips_per_source")
    _positive_int(cfg, "eval", "num_steps")
    if e.every:
        _req(e.root != "", "eval.root", e.root, "with eval.every > 0, a folder of held-out shards "
             "(make data writes data/heldout)")


def load_saved_config(path: str) -> ml_collections.ConfigDict:
    """The config.json a training run wrote, over `default_config()`: fields added to the schema
    since the run keep their defaults, except those whose absence means the older behaviour (a run
    from before the x0 head, space-time RoPE and the residual video head had none of them)."""
    try:
        saved = storage.read_json(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: unreadable config ({e})") from e
    if not isinstance(saved, dict) or "model" not in saved or "data" not in saved:
        raise ConfigError(f"{path}: not a config written by kairos_jax.train (no model / data sections)")
    saved["model"].setdefault("prediction", "velocity")
    saved["model"].setdefault("spatial_rope", False)
    saved["model"].setdefault("video_residual", False)
    saved["model"].setdefault("proprio_input", False)
    saved["data"].setdefault("delta_actions", False)
    cfg = default_config()
    _merge(cfg, saved)
    return cfg


def _merge(c: ml_collections.ConfigDict, saved: dict) -> None:
    for key, value in saved.items():
        if isinstance(value, dict) and key in c and isinstance(c[key], ml_collections.ConfigDict) and key != "phases":
            _merge(c[key], value)
        elif key in c and isinstance(c[key], tuple) and isinstance(value, list):
            c[key] = tuple(tuple(v) if isinstance(v, list) else v for v in value)
        else:
            with c.unlocked():
                c[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
