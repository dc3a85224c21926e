"""The video tokenizer: a causal video autoencoder (the Wan VAE architecture; `model.py`) that maps
[B, T, H, W, 3] videos in [-1, 1] to KL-posterior latents [B, 1 + (T-1)/4, H/8, W/8, C] and back, with
step-by-step (streaming) decoding at constant cost; its folder format (JSON manifest + safetensors weights)
and `load` (`io.py`); the converter from diffusers' `AutoencoderKLWan` weights (`convert.py`,
`python -m kairos_jax.tokenizer.convert --input=DIR --output=DIR`); and phase 0 of the curriculum,
training it on the sources' video (`train.py` on `data.py`'s clips, experiments/tokenizer.py;
`python -m kairos_jax.tokenizer.train`) and its held-out evaluation against a bilinear baseline
(`python -m kairos_jax.tokenizer.evaluate`). Using its latents in the world model lives with the caller.
"""

from kairos_jax.tokenizer.io import Tokenizer, load, save
from kairos_jax.tokenizer.model import TokenizerConfig, VideoAutoencoder

__all__ = ["Tokenizer", "TokenizerConfig", "VideoAutoencoder", "load", "save"]
