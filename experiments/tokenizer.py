"""phase0_tokenizer: phase 0 of the curriculum, training the video tokenizer (the causal Wan-VAE
architecture of kairos_jax/tokenizer/model.py: 8x spatial, 4x temporal compression, KL posterior)
on the video of every source. The world model's phases 1-3 (phase1_video, phase2_human,
phase3_robot) then train on its latents.

    python -m kairos_jax.tokenizer.train --config=experiments/tokenizer.py --workdir=runs/tokenizer
    python -m kairos_jax.tokenizer.evaluate --tokenizer=runs/tokenizer/tokenizer --data_root=data/heldout

The default is sized for a 2-core CPU (about 3 s per step of 4 clips of 5 frames at 64x64 when the
cores are shared) on the local data of `python -m data_pipelines.generate --preset=small
--output=data/small`. At this budget (300 steps, about 20 minutes) it does not yet beat the
bilinear baseline on data/heldout (19.8 vs 21.6 dB PSNR, 0.70 vs 0.71 SSIM, mean over sources):
it reconstructs backgrounds and layout, not yet the small moving objects.

Arguments (`--config=experiments/tokenizer.py:<arg>`):
  ""      the default above
  "test"  a tiny model on 16x16 frames, for the tests
"""

import ml_collections

PHASE = "phase0_tokenizer"


def get_config(arg: str = ""):
    c = ml_collections.ConfigDict()
    c.phase = PHASE
    c.seed = 0
    # kairos_jax.tokenizer.TokenizerConfig (decoder_base_dim 0 = base_dim).
    c.tokenizer = ml_collections.ConfigDict(dict(
        base_dim=8, decoder_base_dim=0, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=1, attn_scales=(),
        temporal_downsample=(False, True, True)))
    c.data = ml_collections.ConfigDict(dict(
        root="data/small",
        # source -> mixing weight (0 leaves a source out); latent sources are skipped
        sources=ml_collections.ConfigDict(dict(passive_video=1.0, human=1.0, reacher=1.0, cheetah=1.0,
                                               pusher=1.0)),
        image_size=64,         # frames are centre-cropped and area-resized to image_size x image_size
        clip_frames=5,         # 1 + 4n frames: frame 0 is encoded alone, then groups of 4
        batch_size=4,
        num_threads=2,
        prefetch=2,
    ))
    c.train = ml_collections.ConfigDict(dict(
        steps=300,
        lr=2e-3,
        warmup_steps=40,
        min_lr_ratio=0.05,     # cosine decay from lr to lr * min_lr_ratio
        b1=0.9,
        b2=0.99,
        weight_decay=1e-4,
        grad_clip=1.0,         # global-norm clip (0: none)
        kl_weight=1e-5,        # x the posterior's KL to N(0, I), mean over latent elements
        dtype="float32",       # compute dtype: float32 or bfloat16 (parameters stay float32)
        log_every=10,
        checkpoint_every=50,
        keep_checkpoints=2,
        async_checkpointing=True,
    ))
    c.stats = ml_collections.ConfigDict(dict(clips=64))  # training clips measured for the latent mean / std
    c.eval = ml_collections.ConfigDict(dict(root="data/heldout", clips=16))  # held-out clips per source
    if arg == "":
        pass
    elif arg == "test":
        c.tokenizer.update(dict(base_dim=4, z_dim=4, dim_mult=(1, 1, 1, 1)))
        c.data.update(dict(image_size=16, clip_frames=5, batch_size=2, num_threads=1, prefetch=1))
        c.train.update(dict(steps=8, lr=3e-3, warmup_steps=2, log_every=2, checkpoint_every=4,
                            async_checkpointing=False))
        c.stats.clips = 4
        c.eval.clips = 2
    else:
        raise ValueError(f"tokenizer: unknown argument {arg!r} (one of '', 'test')")
    return c
