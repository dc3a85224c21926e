"""Config validation: runs before anything compiles; every error names the field and what is allowed."""

from __future__ import annotations

import os
import tempfile

from kairos_jax.diffusion import LOSS_TARGETS, MODES, SIGMA_SAMPLERS
from kairos_jax.model.mixers import MIXERS
from kairos_jax.model.world_model import PREDICTIONS, REMAT_POLICIES
from kairos_jax.sharding import MESH_AXES

IMPLS = ("auto", "reference", "chunked", "pallas")
DTYPES = ("float32", "bfloat16")
PRNG_IMPLS = ("threefry2x32", "rbg", "unsafe_rbg")


class ConfigError(ValueError):
    """A bad config value: the message names the field, the value and the allowed values."""


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

    # data
    for name in ("image_size", "patch_size", "num_blocks", "action_chunk", "action_dim", "proprio_dim",
                 "text_len", "num_embodiments"):
        _positive_int(cfg, "data", name)
    _positive_int(cfg, "data", "worker_count", minimum=0)
    _positive_int(cfg, "data", "image_width", minimum=0)
    _positive_int(cfg, "data", "channels")
    _req(d.image_size % d.patch_size == 0, "data.image_size", d.image_size,
         f"must be a multiple of data.patch_size={d.patch_size}")
    _req(d.image_width % d.patch_size == 0, "data.image_width", d.image_width,
         f"must be 0 (square frames) or a multiple of data.patch_size={d.patch_size}")
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
    for name in ("min_lr_ratio", "clean_block_prob", "text_dropout"):
        _req(0.0 <= t[name] <= 1.0, f"train.{name}", t[name], "must be in [0, 1]")
    _req(0.0 <= t.b1 < 1.0 and 0.0 <= t.b2 < 1.0, "train.b1/b2", (t.b1, t.b2), "must be in [0, 1)")
    _req(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    _req(t.sigma_sampling in SIGMA_SAMPLERS, "train.sigma_sampling", t.sigma_sampling,
         f"one of {SIGMA_SAMPLERS}")
    _req(t.logit_std > 0, "train.logit_std", t.logit_std, "must be > 0")
    _req(t.loss_target in LOSS_TARGETS, "train.loss_target", t.loss_target, f"one of {LOSS_TARGETS}")
    _req(0.0 < t.loss_min_sigma <= 1.0, "train.loss_min_sigma", t.loss_min_sigma, "must be in (0, 1]")
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


    from kairos_jax.sampling import validate_world_action_config

    validate_world_action_config(cfg)


def check_data_sources(cfg) -> None:
    """Every source a phase names must be a folder under data.root (checked before compiling)."""
    root = cfg.data.root
    if not os.path.isdir(root):
        raise ConfigError(f"config.data.root={root!r}: directory does not exist "
                          "(generate local data with `make data` or point data.root at your converted shards)")
    present = sorted(e for e in os.listdir(root) if os.path.isdir(os.path.join(root, e)))
    for name in cfg.curriculum:
        for source in cfg.phases[name].mixture:
            if source not in present:
                raise ConfigError(f"config.phases.{name}.mixture names source {source!r}, but "
                                  f"{os.path.join(root, source)} does not exist; sources under {root}: "
                                  f"{present}")


def check_workdir(workdir: str) -> None:
    """The workdir must be creatable and writable."""
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir!r} cannot be created: {e.strerror}") from None
    # A probe file of this process's own: every process of a multi-process run checks the same
    # (shared) workdir at once, and one shared name raced (one process removed another's probe).
    try:
        fd, probe = tempfile.mkstemp(prefix=".write_test.", dir=workdir)
        with os.fdopen(fd, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir!r} is not writable: {e.strerror}") from None
