"""Reference side of the tokenizer parity test; runs in .venv-diffusers (torch + diffusers), never in .venv.

    .venv-diffusers/bin/python tests/tokenizer/diffusers_reference.py --config=wan21 --out=DIR
    .venv-diffusers/bin/python tests/tokenizer/diffusers_reference.py --config=wan22 --out=DIR --shapes

Builds a small randomly initialised diffusers `AutoencoderKLWan` (no download), perturbs its norm gains and
biases so that every tensor matters, `save_pretrained`s it to DIR/diffusers, runs diffusers' own encode and
decode on a random video in float32 and writes inputs and outputs, channels last, to DIR/reference.npz.
With --shapes it only writes the full-size released architecture's config and tensor shapes to DIR/shapes.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os

import numpy as np
import torch
from diffusers import AutoencoderKLWan

# Small versions of the released layouts: same block structure and factors, far fewer channels.
CONFIGS = {
    # Wan2.1 (Wan-AI/Wan2.1-*-Diffusers vae/): base_dim 96, z_dim 16, 8x spatial, 4x temporal.
    "wan21": dict(config=dict(base_dim=16, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                              temperal_downsample=[False, True, True]),
                  frames=13, size=64),
    # Wan2.2 (Wan-AI/Wan2.2-TI2V-5B-Diffusers vae/): base_dim 160, decoder_base_dim 256, z_dim 48, residual
    # blocks, patch_size 2 -> 16x spatial, 4x temporal.
    "wan22": dict(config=dict(base_dim=16, decoder_base_dim=24, z_dim=8, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                              attn_scales=[], temperal_downsample=[False, True, True], is_residual=True,
                              in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16,
                              scale_factor_temporal=4,
                              latents_mean=[0.1 * i - 0.3 for i in range(8)],
                              latents_std=[1.0 + 0.2 * i for i in range(8)]),
                  frames=13, size=64),
}


# The released architectures (their vae/config.json, less the latent statistics), for the layout check.
RELEASED = {
    "wan21": dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                  temperal_downsample=[False, True, True], dropout=0.0),
    "wan22": dict(base_dim=160, decoder_base_dim=256, z_dim=48, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                  attn_scales=[], temperal_downsample=[False, True, True], dropout=0.0, is_residual=True,
                  in_channels=12, out_channels=12, patch_size=2, scale_factor_spatial=16, scale_factor_temporal=4),
}


def released_shapes(name: str, out: str) -> None:
    """Write the released architecture's config and state-dict shapes (built on the meta device: no memory)."""
    with torch.device("meta"):
        vae = AutoencoderKLWan(**RELEASED[name])
    shapes = {k: list(v.shape) for k, v in vae.state_dict().items()}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "shapes.json"), "w") as f:
        json.dump({"config": dict(vae.config), "shapes": shapes}, f)


@contextlib.contextmanager
def no_output_clamp():
    """diffusers clamps decoded videos to [-1, 1]; lift that clamp (only) to compare the raw decoder output."""
    clamp = torch.clamp

    def passthrough(x, *args, **kwargs):
        if not args and kwargs.get("min") == -1.0 and kwargs.get("max") == 1.0:
            return x
        return clamp(x, *args, **kwargs)

    torch.clamp = passthrough
    try:
        yield
    finally:
        torch.clamp = clamp


def channels_last(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 4, 1).contiguous().numpy().astype(np.float32)   # [B, C, T, H, W] -> [B, T, H, W, C]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", choices=sorted(CONFIGS), required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shapes", action="store_true", help="only write the released layout's tensor shapes")
    args = parser.parse_args()
    if args.shapes:
        released_shapes(args.config, args.out)
        return
    torch.set_num_threads(int(os.environ.get("REFERENCE_THREADS", "2")))
    torch.manual_seed(args.seed)
    spec = CONFIGS[args.config]

    vae = AutoencoderKLWan(**spec["config"]).eval().float()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.25 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    model_dir = os.path.join(args.out, "diffusers")
    vae.save_pretrained(model_dir, safe_serialization=True)

    b, t, s = 1, spec["frames"], spec["size"]
    video = torch.rand(b, 3, t, s, s) * 2.0 - 1.0
    with torch.no_grad():
        dist = vae.encode(video).latent_dist
        mean, logvar = dist.mean, dist.logvar
        decoded = vae.decode(mean).sample
        with no_output_clamp():
            decoded_raw = vae.decode(mean).sample
    np.savez(os.path.join(args.out, "reference.npz"), video=channels_last(video), mean=channels_last(mean),
             logvar=channels_last(logvar), decoded=channels_last(decoded), decoded_raw=channels_last(decoded_raw))
    import diffusers

    with open(os.path.join(args.out, "versions.json"), "w") as f:
        json.dump({"torch": torch.__version__, "diffusers": diffusers.__version__}, f)


if __name__ == "__main__":
    main()
