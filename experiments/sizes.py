"""Model sizes shared by the experiment files (`--config=experiments/phase1_video.py:4b`)."""

import ml_collections


def apply_size(c: ml_collections.ConfigDict, size: str) -> ml_collections.ConfigDict:
    """Set the model (and the batch / mesh that go with it) to a named size in place."""
    if size in ("", "base"):
        return c
    if size == "embedded":
        c.model.update(dict(video_width=128, action_width=64, depth=4, num_heads=4, head_dim=32,
                            text_width=64, text_depth=1, text_heads=2, cond_dim=64, dtype="float32",
                            mlp_ratio=3.0))
        c.data.update(dict(image_size=32, patch_size=8, num_blocks=8, action_chunk=4))
        c.train.update(dict(batch_size=8, lr=1e-3, warmup_steps=30))
        return c
    if size == "4b":
        # The paper's size: width 2560, 32 layers, 20 heads, [swa, swa, dswa, gdn], dilation 4,
        # action expert width 1024. bf16 compute, fp32 master weights, full remat, FSDP over hosts.
        c.model.update(dict(video_width=2560, action_width=1024, depth=32, num_heads=20, head_dim=128,
                            mlp_ratio=4.0, pattern=("swa", "swa", "dswa", "gdn"), window=8, dilation=4,
                            text_width=1024, text_depth=6, text_heads=16, cond_dim=512, dtype="bfloat16",
                            param_dtype="float32", scan_layers=True, remat="full"))
        # The paper's sequence shape: 21 latent frames of 30 x 52 tokens, i.e. 480 x 832 video through
        # an 8x spatially downsampling VAE (16 latent channels, pre-encoded by the converter's
        # --encoder) and 2 x 2 patches; 8 action tokens per block: 21 x 1568 = 32,928 tokens per clip.
        c.data.update(dict(image_size=60, image_width=104, channels=16, patch_size=2, num_blocks=21,
                           action_chunk=8, text_len=128))
        c.train.update(dict(batch_size=32, lr=2e-4, warmup_steps=2000, grad_accum=1))
        c.mesh.update(dict(data=1, fsdp=-1, tensor=1, context=1))
        return c
    raise ValueError(f"unknown model size {size!r}; allowed: '', 'base', 'embedded', '4b'")
