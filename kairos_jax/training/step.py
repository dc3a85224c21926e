"""Sharded train state and the jitted train step.

The state is a plain pytree {"step", "params", "opt_state"}: params are the model's nnx.Param
values as a pure dict (fp32 master weights), merged with the model's graph inside the step.
Everything is created directly sharded: the model is built abstractly (nnx.eval_shape), its
logical axis names are mapped to the mesh by the rules table, and init runs under jit with those
output shardings, so no host ever holds the full model.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from data_pipelines.pipeline import batch_spec, check_batch
from kairos_jax.model import KairosWorldModel, TokenLayout, diffusion
from kairos_jax.model.text import batch_text, drop_text
from kairos_jax.parallel.sharding import activation_sharding, logical_to_mesh_spec, state_shardings
from kairos_jax.training.metrics import matmul_flops


def make_schedule(train_cfg, total_steps: int):
    """Linear warm-up to lr, then cosine decay to lr * min_lr_ratio at total_steps."""
    warmup = min(train_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=train_cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=train_cfg.lr * train_cfg.min_lr_ratio)


def _decay_mask(params):
    # Weight decay on matrices only: not on biases, norm scales, gates, or 1-D decay parameters.
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def make_optimizer(train_cfg, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(train_cfg.clip_norm),
        optax.adamw(make_schedule(train_cfg, total_steps), b1=train_cfg.b1, b2=train_cfg.b2,
                    weight_decay=train_cfg.weight_decay, mask=_decay_mask),
    )


@dataclasses.dataclass
class Setup:
    """What the loop needs about the model and its sharding."""

    graphdef: nnx.GraphDef
    abstract_params: dict          # ShapeDtypeStructs of the params (pure dict)
    param_shardings: dict          # NamedSharding per param
    layout: TokenLayout
    mesh: Mesh
    rules: tuple
    batch_spec: dict               # the batch contract (data_pipelines.pipeline.batch_spec), global batch


def build_model_setup(cfg, mesh: Mesh) -> Setup:
    rules = tuple(cfg.logical_axis_rules)
    abstract_model = nnx.eval_shape(lambda: KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(0)))
    graphdef, abstract_state = nnx.split(abstract_model, nnx.Param)
    shardings = nnx.to_pure_dict(state_shardings(abstract_state, mesh, rules))
    abstract = nnx.to_pure_dict(abstract_state)
    return Setup(graphdef, abstract, shardings, abstract_model.layout, mesh, rules,
                 batch_spec(cfg.data, cfg.train.batch_size))


def init_params(cfg, setup: Setup, seed: int):
    """Initialise the model directly into its sharded layout."""

    @functools.partial(jax.jit, out_shardings=setup.param_shardings)
    def init():
        key = jax.random.key(seed, impl=cfg.model.init_prng)
        model = KairosWorldModel(cfg.model, cfg.data, rngs=nnx.Rngs(key))
        return nnx.to_pure_dict(nnx.state(model, nnx.Param))

    with activation_sharding(setup.mesh, setup.rules):
        return init()


def init_train_state(cfg, setup: Setup, tx, params):
    """{step, params, opt_state} from given (sharded) params, optimizer state sharded like them."""
    opt_shardings = opt_state_shardings(tx, setup)
    opt_state = jax.jit(tx.init, out_shardings=opt_shardings)(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), NamedSharding(setup.mesh, PartitionSpec()))
    return {"step": step, "params": params, "opt_state": opt_state}


def opt_state_shardings(tx, setup: Setup):
    """Optimizer moments are sharded like their parameters; counters are replicated."""
    abstract_opt = jax.eval_shape(tx.init, setup.abstract_params)
    replicated = NamedSharding(setup.mesh, PartitionSpec())
    return optax.tree_map_params(tx, lambda _, s: s, abstract_opt, setup.param_shardings,
                                 transform_non_params=lambda _: replicated)


def state_shardings_tree(tx, setup: Setup):
    return {"step": NamedSharding(setup.mesh, PartitionSpec()),
            "params": setup.param_shardings,
            "opt_state": opt_state_shardings(tx, setup)}


def abstract_train_state(tx, setup: Setup):
    """ShapeDtypeStructs with shardings: the restore target for Orbax (any mesh)."""
    shapes = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": setup.abstract_params,
              "opt_state": jax.eval_shape(tx.init, setup.abstract_params)}
    shards = state_shardings_tree(tx, setup)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shards)


def batch_sharding(setup: Setup, key: str) -> NamedSharding:
    """How the global batch's `key` is laid out: its contract's logical axes through the rules."""
    spec = logical_to_mesh_spec(setup.batch_spec[key].logical_axes, setup.rules, setup.mesh)
    return NamedSharding(setup.mesh, spec)


def abstract_batch(setup: Setup) -> dict:
    """ShapeDtypeStructs of one global batch, sharded as `global_batch` shards real ones: what an
    AOT compile of the train step takes."""
    return {k: jax.ShapeDtypeStruct(f.shape, jnp.dtype(f.dtype), sharding=batch_sharding(setup, k))
            for k, f in setup.batch_spec.items()}


def global_batch(setup: Setup, local_batch: dict) -> dict:
    """This process's numpy batch -> global jax arrays sharded over the batch axes. The batch must
    follow the contract (every key, shape and dtype; ValueError naming the first that does not)."""
    local = setup.batch_spec["video"].shape[0] // jax.process_count()
    check_batch(local_batch, setup.batch_spec, batch_size=local)
    return {k: jax.make_array_from_process_local_data(batch_sharding(setup, k), np.asarray(x))
            for k, x in local_batch.items()}


def example_draws(rng, index, batch, *, cfg, mode_probs) -> dict:
    """Every random draw of the loss, made per example from fold_in(rng, its index in the step's
    batch): noise levels and loss weights (`diffusion.draw_noise_levels`), the video and action
    noise, text dropout, the reference frame's noise and the state input's dropout. An example gets
    the same draws whether its batch is split into micro-batches or not. index: int [B]."""
    video, actions = batch["video"], batch["actions"]
    T = video.shape[1]
    has_actions = jnp.sum(batch["action_mask"], axis=-1) > 0

    def one(i, has_actions, action_mask, reference):
        r_levels, r_ev, r_ea, r_text, r_ref, r_state = jax.random.split(jax.random.fold_in(rng, i), 6)
        lv = diffusion.draw_noise_levels(r_levels, batch_size=1, num_blocks=T, mode_probs=mode_probs,
                                         has_actions=has_actions[None], action_mask=action_mask[None],
                                         train_cfg=cfg.train)
        out = {k: v[0] for k, v in lv.items()}
        out["eps_video"] = jax.random.normal(r_ev, video.shape[1:], jnp.float32)
        out["eps_action"] = jax.random.normal(r_ea, actions.shape[1:], jnp.float32)
        out["keep_text"] = jax.random.uniform(r_text) >= cfg.train.text_dropout
        if cfg.train.reference_noise > 0:
            out["reference"] = diffusion.perturb_reference(r_ref, reference[None], cfg.train.reference_noise)[0]
        else:
            out["reference"] = reference
        out["keep_state"] = jax.random.uniform(r_state, (T,)) >= cfg.train.proprio_input_dropout
        return out

    # a residual video head adds each block's previous recorded (clean) frame, as a rollout adds the
    # previous committed one
    reference = diffusion.previous_frames(video)
    return jax.vmap(one)(index, has_actions, batch["action_mask"], reference)


def batch_normalizers(rng, batch, *, cfg, mode_probs) -> dict:
    """The loss divisors of a whole batch (`diffusion.loss_normalizers`), from its draws."""
    B = batch["video"].shape[0]
    draws = example_draws(rng, jnp.arange(B), batch, cfg=cfg, mode_probs=mode_probs)
    return diffusion.loss_normalizers(draws["weight_video"], draws["weight_action"], batch)


def loss_fn(params, graphdef, batch, rng, *, cfg, mode_probs, num_sources: int, index=None, norms=None):
    """Rectified-flow loss of one (micro)batch plus the readout losses where the batch has labels
    (proprio, progress); returns (loss, metrics).

    index: int [B], each example's place in the step's whole batch (default 0..B-1): its random
    draws come from fold_in(rng, index) (`example_draws`). norms: the whole batch's loss divisors
    (`batch_normalizers`; default this batch's own), so that micro-batch losses and gradients sum
    to the whole batch's exactly."""
    model = nnx.merge(graphdef, params)
    video, actions = batch["video"], batch["actions"]
    B, T = video.shape[:2]
    dim_mask = batch["action_dim_mask"]
    index = jnp.arange(B) if index is None else index
    lv = example_draws(rng, index, batch, cfg=cfg, mode_probs=mode_probs)
    if norms is None:
        norms = diffusion.loss_normalizers(lv["weight_video"], lv["weight_action"], batch)
    eps_v = lv["eps_video"]
    eps_a = lv["eps_action"] * dim_mask[:, None, None]
    x_v = diffusion.add_noise(video, eps_v, lv["sigma_video"])
    x_a = diffusion.add_noise(actions, eps_a, lv["sigma_action"])
    text = drop_text(batch_text(batch, cfg.model.text_encoder), lv["keep_text"])
    state = None
    if cfg.model.proprio_input:
        # each block's chunk starts from the previous block's state; hidden on a random fraction of
        # blocks (absent), as it is for a generated frame
        state = (diffusion.previous_frames(batch["proprio"]),
                 diffusion.previous_frames(batch["proprio_mask"]) * lv["keep_state"])
    out = model(x_v, x_a, lv["sigma_video"], lv["sigma_action"], batch["embodiment_id"], dim_mask, text,
                reference=lv["reference"], state=state)
    x0_head = cfg.model.prediction == "x0"
    video_loss, action_loss, (v_err, a_err) = diffusion.flow_losses(
        out.video_x0 if x0_head else out.video_velocity, out.action_x0 if x0_head else out.action_velocity,
        video, eps_v, actions, eps_a, lv["sigma_video"], lv["sigma_action"], lv["weight_video"],
        lv["weight_action"], dim_mask, prediction=cfg.model.prediction, loss_target=cfg.train.loss_target,
        min_sigma=cfg.train.loss_min_sigma, norms=norms)
    loss = cfg.train.video_loss_weight * video_loss + cfg.train.action_loss_weight * action_loss
    readouts = diffusion.readout_losses(out.proprio, out.progress, batch, norms)
    for name, value in readouts.items():
        loss = loss + cfg.train[f"{name}_loss_weight"] * value
    # Per-source sums (divided after accumulation) so each source's loss can be followed.
    src = jax.nn.one_hot(batch["source_id"], num_sources)                                   # [B, S]
    metrics = {
        "loss": loss, "loss_video": video_loss, "loss_action": action_loss,
        **{f"loss_{name}": value for name, value in readouts.items()},
        "src_video_err": src.T @ jnp.sum(v_err * lv["weight_video"], 1),
        "src_video_w": src.T @ jnp.sum(lv["weight_video"], 1),
        "src_action_err": src.T @ jnp.sum(a_err * lv["weight_action"], 1),
        "src_action_w": src.T @ jnp.sum(lv["weight_action"], 1),
        "mode_counts": jnp.sum(jax.nn.one_hot(lv["mode"], len(diffusion.MODES)), 0),
    }
    return loss, metrics


def make_train_step(cfg, setup: Setup, tx, phase_cfg, num_sources: int):
    """The jitted step: (state, batch) -> (state, metrics). Gradient accumulation over
    `train.grad_accum` micro-batches; the step's randomness is fold_in(seed, step), so a resumed
    run draws exactly the same noise."""
    mode_probs = diffusion.mode_weights(phase_cfg.modes)
    accum = cfg.train.grad_accum
    base_key = jax.random.key(cfg.seed)
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, cfg=cfg, mode_probs=mode_probs, num_sources=num_sources), has_aux=True)
    state_sh = state_shardings_tree(tx, setup)

    def step_fn(state, batch):
        rng = jax.random.fold_in(base_key, state["step"])
        params = state["params"]
        if accum == 1:
            (loss, metrics), grads = grad_fn(params, setup.graphdef, batch, rng)
        else:
            # Exact accumulation: every example draws its noise from its index in the whole batch, and
            # every loss is divided by the whole batch's total weight, so the micro-batch losses,
            # gradients and metrics are summed (not averaged) into the whole batch's.
            B = batch["video"].shape[0]
            m = B // accum
            norms = batch_normalizers(rng, batch, cfg=cfg, mode_probs=mode_probs)
            micro = jax.tree.map(lambda x: x.reshape((accum, m) + x.shape[1:]), batch)

            def body(carry, xs):
                g_acc, m_acc = carry
                mb, i = xs
                (_, mets), g = grad_fn(params, setup.graphdef, mb, rng, index=i * m + jnp.arange(m), norms=norms)
                return (jax.tree.map(jnp.add, g_acc, g), jax.tree.map(jnp.add, m_acc, mets)), None

            zeros_g = jax.tree.map(jnp.zeros_like, params)
            m_shape = jax.eval_shape(lambda: grad_fn(params, setup.graphdef, jax.tree.map(lambda x: x[0], micro),
                                                     rng, index=jnp.arange(m), norms=norms)[0][1])
            zeros_m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m_shape)
            (grads, metrics), _ = jax.lax.scan(body, (zeros_g, zeros_m), (micro, jnp.arange(accum)))
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # A non-finite loss or gradient (a bad batch, an overflow) skips the update: parameters and
        # optimizer state stay as they were, the step and the data still advance, and the step is
        # counted ("skipped") so the loop can report it and stop when there are too many.
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        params, opt_state = keep(new_params, params), keep(opt_state, state["opt_state"])
        metrics = {k: jnp.where(finite, v, jnp.zeros_like(v)) for k, v in metrics.items()}
        metrics["grad_norm"] = jnp.where(finite, grad_norm, 0.0)
        metrics["param_norm"] = optax.tree.norm(params)
        metrics["skipped"] = (~finite).astype(jnp.int32)
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    # The batch arrives already sharded (global_batch); its layout is taken as given.
    jitted = jax.jit(step_fn, in_shardings=(state_sh, None), out_shardings=(state_sh, None),
                     donate_argnums=(0,))

    def run(state, batch):
        with activation_sharding(setup.mesh, setup.rules):
            return jitted(state, batch)

    def compile_for(state, batch):
        """AOT-compile for these arguments; the result is called like the step (and reports cost)."""
        with activation_sharding(setup.mesh, setup.rules):
            return jitted.lower(state, batch).compile()

    def model_flops(state, batch) -> float:
        """Global matmul FLOPs of one step, from its jaxpr (every scan iteration counted)."""
        with activation_sharding(setup.mesh, setup.rules):
            jaxpr = jax.make_jaxpr(jitted)(state, batch)
        return matmul_flops(jaxpr.jaxpr)[0]

    run.jitted = jitted
    run.compile = compile_for
    run.flops = model_flops
    return run
