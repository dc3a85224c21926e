"""Rectified flow over step blocks with a noise level per modality per block (docs/architecture.md §2).

    x_sigma = (1 - sigma) x0 + sigma eps,   target velocity v = eps - x0
    sigma = 0: given / clean;  sigma = 1: absent / marginalised.

Training modes set which modality of which block is noisy, clean or absent; within a mode, the
noise levels of different blocks are drawn independently (diffusion forcing across time), and a
fraction of blocks is kept clean so the model also sees clean history, as at rollout time.

| mode              | actions (a_{t-1} in block t)   | video (o_t in block t)               | loss on |
| joint             | noisy                          | noisy                                | both    |
| video_prediction  | sigma = 1                      | noisy                                | video   |
| forward_dynamics  | sigma = 0                      | noisy                                | video   |
| inverse_dynamics  | noisy                          | sigma = 0                            | action  |
| policy            | noisy                          | sigma = 0 before block tau, 1 from it | action  |

In policy mode, block tau is p(a_{tau-1} | o_{<tau}) (the policy), earlier blocks see their own frame
(inverse dynamics) and later blocks predict further actions open loop. Samples without actions
are trained as video_prediction; blocks whose action chunk is unknown have actions at sigma = 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MODES = ("joint", "policy", "forward_dynamics", "inverse_dynamics", "video_prediction")
SIGMA_SAMPLERS = ("logit_normal", "uniform")
LOSS_TARGETS = ("velocity", "x0")

# What a mode does to a modality of a block (the table above); shared with the samplers.
CLEAN, ABSENT, NOISY = 0, 1, 2
# Modalities each mode generates (and trains): (actions, video).
GENERATES = {
    "joint": (True, True),
    "policy": (True, False),
    "forward_dynamics": (False, True),
    "inverse_dynamics": (True, False),
    "video_prediction": (False, True),
}


def mode_rules(mode, tau, num_blocks: int):
    """CLEAN / ABSENT / NOISY per block for each modality.

    mode: int [B] (index into MODES); tau: int [B, 1] (policy: first block whose video is absent).
    Returns (action_rule, video_rule), int32 [B, T]. Blocks whose action chunk is unknown are
    ABSENT on top of this (see `draw_noise_levels`).
    """
    t = jnp.arange(num_blocks)[None]
    m = jnp.asarray(mode)[:, None]
    is_ = lambda name: m == MODES.index(name)
    video = jnp.select([is_("inverse_dynamics"), is_("policy")],
                       [jnp.int32(CLEAN), jnp.where(t < tau, CLEAN, ABSENT)], jnp.int32(NOISY))
    action = jnp.select([is_("video_prediction"), is_("forward_dynamics")],
                        [jnp.int32(ABSENT), jnp.int32(CLEAN)], jnp.int32(NOISY))
    shape = (m.shape[0], num_blocks)
    return jnp.broadcast_to(action, shape).astype(jnp.int32), jnp.broadcast_to(video, shape).astype(jnp.int32)


def sigma_from_rule(rule, noisy_sigma):
    """sigma = 0 (CLEAN), 1 (ABSENT) or `noisy_sigma` (NOISY)."""
    return jnp.select([rule == CLEAN, rule == ABSENT], [0.0, 1.0], noisy_sigma)


def sample_sigma(rng, shape, *, sampling: str, logit_mean=0.0, logit_std=1.0, shift=1.0):
    """Noise levels in (0, 1): logit-normal (SD3) or uniform, then the time shift
    sigma' = shift * sigma / (1 + (shift - 1) * sigma) (shift > 1 favours high noise)."""
    if sampling == "logit_normal":
        s = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, shape))
    elif sampling == "uniform":
        s = jax.random.uniform(rng, shape)
    else:
        raise ValueError(f"sigma sampling {sampling!r} is not one of {SIGMA_SAMPLERS}")
    return shift * s / (1.0 + (shift - 1.0) * s)


def mode_weights(modes_cfg) -> jnp.ndarray:
    return jnp.asarray([float(modes_cfg[m]) for m in MODES], jnp.float32)


def draw_noise_levels(rng, *, batch_size: int, num_blocks: int, mode_probs, has_actions, action_mask,
                      train_cfg):
    """Per-block, per-modality sigmas and loss weights for a batch.

    mode_probs: [len(MODES)]; has_actions: bool [B]; action_mask: [B, T] (block's chunk known).
    Returns dict with sigma_video, sigma_action, weight_video, weight_action ([B, T]), mode [B] and
    tau [B, 1] (policy mode's first block with absent video).
    """
    B, T = batch_size, num_blocks
    r_mode, r_v, r_a, r_cv, r_ca, r_tau = jax.random.split(rng, 6)
    logits = jnp.log(jnp.maximum(mode_probs, 0.0) / jnp.sum(mode_probs))
    mode = jax.random.categorical(r_mode, logits, shape=(B,))
    mode = jnp.where(has_actions, mode, MODES.index("video_prediction"))
    kw = dict(sampling=train_cfg.sigma_sampling, logit_mean=train_cfg.logit_mean,
              logit_std=train_cfg.logit_std, shift=train_cfg.sigma_shift)
    s_v = sample_sigma(r_v, (B, T), **kw)
    s_a = sample_sigma(r_a, (B, T), **kw)
    # Diffusion forcing with clean context: some blocks are given clean.
    s_v = jnp.where(jax.random.uniform(r_cv, (B, T)) < train_cfg.clean_block_prob, 0.0, s_v)
    s_a = jnp.where(jax.random.uniform(r_ca, (B, T)) < train_cfg.clean_block_prob, 0.0, s_a)
    tau = jax.random.randint(r_tau, (B, 1), 0, T)
    action_rule, video_rule = mode_rules(mode, tau, T)
    sigma_video = sigma_from_rule(video_rule, s_v)
    sigma_action = sigma_from_rule(action_rule, s_a)
    known = action_mask > 0
    sigma_action = jnp.where(known, sigma_action, 1.0)
    # train.action_history_dropout: a fraction of the policy-mode examples get every chunk absent, so
    # each is predicted from the state and frames alone (drawn from a key of its own: the other
    # draws are the same whatever the fraction)
    p_hide = float(train_cfg.get("action_history_dropout", 0.0))
    if p_hide > 0:
        hide = (mode == MODES.index("policy")) & (jax.random.uniform(jax.random.fold_in(rng, 7), (B,)) < p_hide)
        sigma_action = jnp.where(hide[:, None], 1.0, sigma_action)

    generates = jnp.asarray([GENERATES[name] for name in MODES])                  # [modes, 2]
    gen_action, gen_video = generates[mode, 0][:, None], generates[mode, 1][:, None]
    weight_video = (gen_video & (sigma_video > 0)).astype(jnp.float32)
    weight_action = (gen_action & (sigma_action > 0) & known).astype(jnp.float32)
    return dict(sigma_video=sigma_video, sigma_action=sigma_action, weight_video=weight_video,
                weight_action=weight_action, mode=mode, tau=tau)


def previous_frames(video, first=None):
    """The reference frames of a residual video head: block t gets block t-1's (clean) video, block 0
    `first` ([B, N, Dp]; zeros when None: no earlier frame). video [B, T, N, Dp] -> [B, T, N, Dp]."""
    head = jnp.zeros_like(video[:, :1]) if first is None else first[:, None].astype(video.dtype)
    return jnp.concatenate([head, video[:, :-1]], axis=1)


def perturb_reference(rng, reference, max_std: float):
    """reference [B, T, N, Dp] plus Gaussian noise of a std drawn per block from U(0, max_std): a
    residual head trained on it cannot take its reference frame for the truth (a rollout's reference
    is its own previous prediction, with that prediction's error)."""
    r_std, r_eps = jax.random.split(rng)
    std = jax.random.uniform(r_std, reference.shape[:2], jnp.float32, 0.0, max_std)
    return reference + std[:, :, None, None] * jax.random.normal(r_eps, reference.shape, jnp.float32)


def add_noise(x0, eps, sigma):
    """x_sigma = (1 - sigma) x0 + sigma eps with sigma [B, T] broadcast over the block's tokens."""
    s = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim))
    return (1.0 - s) * x0 + s * eps


def per_block_errors(pred, x0, eps, sigma, *, prediction: str, loss_target: str, min_sigma: float):
    """Squared error per element of one modality, [B, T, ...], for a head that predicts
    `prediction` ("x0" or "velocity") and a loss on `loss_target`:

    - velocity target: || v_hat - (eps - x0) ||^2. With an x0 head, v_hat = (x_sigma - x0_hat) / sigma,
      i.e. || x0_hat - x0 ||^2 / sigma^2, with sigma clamped below at `min_sigma` so the nearly
      clean blocks do not dominate (the x-prediction, v-loss of Li and He 2025).
    - x0 target: || x0_hat - x0 ||^2 (x0_hat = x_sigma - sigma v_hat for a velocity head).
    """
    s = sigma.reshape(sigma.shape + (1,) * (x0.ndim - sigma.ndim))
    if prediction == "x0":
        err = jnp.square(pred - x0)
        return err / jnp.square(jnp.maximum(s, min_sigma)) if loss_target == "velocity" else err
    err = jnp.square(pred - (eps - x0))
    return err if loss_target == "velocity" else err * jnp.square(s)


def flow_losses(pred_video, pred_action, x0_video, eps_video, x0_action, eps_action, sigma_video,
                sigma_action, weight_video, weight_action, action_dim_mask, *, prediction: str = "velocity",
                loss_target: str = "velocity", min_sigma: float = 0.05, norms: dict | None = None):
    """Masked rectified-flow MSE per modality (see `per_block_errors` for the parameterisations).

    pred_*: the heads' outputs (x0 or velocity, as `prediction` says). Video: mean over tokens and
    patch dims per block; actions: mean over the embodiment's real dims and the k tokens per block.
    Each modality is averaged over the (block) weights > 0: divided by the sum of its weights, or by
    norms["video"] / norms["action"] when given (a micro-batch's share of the whole batch's mean:
    the sums of `loss_normalizers` over the whole batch, so that the micro-batch losses add up to it).
    Returns (video_loss, action_loss, per-block errors [B, T] for metrics).
    """
    kw = dict(prediction=prediction, loss_target=loss_target, min_sigma=min_sigma)
    v_err = jnp.mean(per_block_errors(pred_video, x0_video, eps_video, sigma_video, **kw), axis=(2, 3))
    a_sq = per_block_errors(pred_action, x0_action, eps_action, sigma_action, **kw) * action_dim_mask[:, None, None]
    dims = jnp.maximum(jnp.sum(action_dim_mask, axis=-1), 1.0)[:, None]
    a_err = jnp.mean(jnp.sum(a_sq, axis=-1), axis=-1) / dims                              # [B, T]
    norms = norms or {"video": jnp.sum(weight_video), "action": jnp.sum(weight_action)}
    video_loss = jnp.sum(v_err * weight_video) / jnp.maximum(norms["video"], 1.0)
    action_loss = jnp.sum(a_err * weight_action) / jnp.maximum(norms["action"], 1.0)
    return video_loss, action_loss, (v_err, a_err)


def readout_masks(batch) -> dict:
    """The element masks of the readout losses present in `batch` ([B, T, P] and [B, T])."""
    out = {}
    if "proprio" in batch:
        out["proprio"] = batch["proprio_mask"][:, :, None] * batch["proprio_dim_mask"][:, None, :]
    if "progress" in batch:
        out["progress"] = batch.get("progress_mask", jnp.ones_like(batch["progress"]))
    return out


def loss_normalizers(weight_video, weight_action, batch) -> dict:
    """What each loss is divided by: the sums of its weights or masks over `batch` (`flow_losses`,
    `readout_losses`). Computed over a whole batch and passed to each micro-batch's losses, they make
    gradient accumulation exact: the micro-batch losses sum to the whole batch's."""
    out = {"video": jnp.sum(weight_video), "action": jnp.sum(weight_action)}
    out.update({name: jnp.sum(mask) for name, mask in readout_masks(batch).items()})
    return out


def readout_losses(proprio_pred, progress_pred, batch, norms: dict | None = None):
    """Masked MSE of the readout heads where the batch has labels.

    proprio_pred [B, T, P] against batch["proprio"], masked by proprio_mask [B, T] x proprio_dim_mask
    [B, P] and averaged over the masked entries; progress_pred [B, T] against batch["progress"],
    masked by batch["progress_mask"] [B, T] when present (every block otherwise). A loss whose labels
    are not in the batch is absent from the result. norms: each loss's divisor (default: the sum of
    its mask; see `loss_normalizers`).
    """
    out = {}
    preds = {"proprio": proprio_pred, "progress": progress_pred}
    for name, mask in readout_masks(batch).items():
        err = jnp.square(preds[name] - batch[name]) * mask
        out[name] = jnp.sum(err) / jnp.maximum(jnp.sum(mask) if norms is None else norms[name], 1.0)
    return out
