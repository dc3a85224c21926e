"""Held-out reconstruction quality of a tokenizer, per source, against a trivial baseline.

    python -m kairos_jax.tokenizer.evaluate --tokenizer=runs/tokenizer/tokenizer --data_root=data/heldout \
        [--clips=16] [--clip_frames=5] [--image_size=64] [--seed=0] [--out=DIR]

For every frame source under --data_root: --clips clips of --clip_frames frames (drawn as in training,
kairos_jax.tokenizer.data, seeded by --seed), encoded to the posterior mean and decoded; PSNR and SSIM
(kairos_jax.inference.quality, on uint8 frames, peak 255) averaged over frames and clips. The baseline is
a bilinear (antialiased, jax.image.resize) down-sample of every frame by the tokenizer's spatial factor and
back up: the same spatial compression with no learning and no temporal compression. Prints one JSON line;
with --out, also writes DIR/tokenizer_eval.json and DIR/reconstructions.png (per source, one clip: the
original frames over the reconstruction over the baseline, 4x nearest upscale).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from data_pipelines import storage
from data_pipelines.pipeline import ConfigError
from kairos_jax import cli
from kairos_jax.inference.quality import psnr, ssim
from kairos_jax.tokenizer import data as data_lib

_TOKENIZER = flags.DEFINE_string("tokenizer", None, "A tokenizer folder (kairos_jax.tokenizer.save).")
# `--clips` has the meaning (and default) of kairos_jax.evaluate's flag; allow_override lets both modules be
# imported in one process (absl keeps one flag per name), read through FLAGS.clips.
flags.DEFINE_integer("clips", 16, "Held-out clips per source.", lower_bound=1, allow_override=True)
_CLIP_FRAMES = flags.DEFINE_integer("clip_frames", 5, "Frames per clip (1 + 4k).", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 64, "Frames are centre-cropped and resized to this size.",
                                   lower_bound=8)


def bilinear_baseline(video: np.ndarray, factor: int) -> np.ndarray:
    """float [B, T, H, W, C] in [-1, 1] -> the same, each frame bilinearly down-sampled by `factor` and back."""
    b, t, h, w, c = video.shape
    small = jax.image.resize(jnp.asarray(video), (b, t, h // factor, w // factor, c), "bilinear")
    return np.asarray(jax.image.resize(small, (b, t, h, w, c), "bilinear"))


def _frame_scores(truth: np.ndarray, pred: np.ndarray) -> tuple[list[float], list[float]]:
    p, s = [], []
    for a, b in zip(truth.reshape((-1,) + truth.shape[-3:]), pred.reshape((-1,) + pred.shape[-3:])):
        p.append(min(psnr(a, b), 100.0))     # identical frames: inf, capped so means stay finite
        s.append(ssim(a, b))
    return p, s


def frame_sources(root: str) -> list[str]:
    """The sub-folders of `root` that are shard sources of frames (sorted)."""
    if not storage.isdir(root):
        raise ConfigError(f"--data_root={root!r} is not a folder")
    names = []
    for name in sorted(storage.listdir(root)):
        if storage.isfile(storage.join(root, name, "manifest.json")):
            names.append(name)
    return names


def evaluate_tokenizer(tok, data_root: str, *, clips: int = 16, clip_frames: int = 5, image_size: int = 64,
                       seed: int = 0, batch_size: int = 4, sources: list[str] | None = None,
                       png: str | None = None) -> dict:
    """{"sources": {name: {psnr, ssim, bilinear_psnr, bilinear_ssim, clips}}, "mean": {...}, ...}."""
    factor = tok.spatial_compression
    if image_size % factor:
        raise ConfigError(f"image_size={image_size} must be a multiple of the tokenizer's spatial compression "
                          f"{factor}")
    if (clip_frames - 1) % tok.temporal_compression:
        raise ConfigError(f"clip_frames={clip_frames} must be 1 + k * {tok.temporal_compression}")
    names = sources if sources is not None else frame_sources(data_root)
    frame_names = [n for n, _, _ in data_lib.open_sources(data_root, names, clip_frames)]
    result = {"tokenizer": tok.manifest.get("source", {}).get("trained_by", "tokenizer"), "data_root": data_root,
              "clips_per_source": clips, "clip_frames": clip_frames, "image_size": image_size,
              "baseline": f"bilinear {factor}x down/up per frame", "sources": {}}
    sample_rows = []
    for name in frame_names:
        ds = data_lib.clip_dataset(data_root, {name: 1.0}, clip_frames=clip_frames, image_size=image_size,
                                   batch_size=batch_size, seed=seed, num_threads=1, prefetch=1, batched=False)
        it = iter(ds)
        videos = np.stack([next(it)["video"] for _ in range(clips)])
        scores = {"psnr": [], "ssim": [], "bilinear_psnr": [], "bilinear_ssim": []}
        for i in range(0, clips, batch_size):
            video = videos[i:i + batch_size]
            truth = data_lib.to_uint8(video)
            recon = data_lib.to_uint8(tok.decode(tok.encode(video)))
            base = data_lib.to_uint8(bilinear_baseline(video, factor))
            p, s = _frame_scores(truth, recon)
            bp, bs = _frame_scores(truth, base)
            scores["psnr"] += p
            scores["ssim"] += s
            scores["bilinear_psnr"] += bp
            scores["bilinear_ssim"] += bs
            if i == 0:
                sample_rows.append((name, truth[0], recon[0], base[0]))
        result["sources"][name] = {k: float(np.mean(v)) for k, v in scores.items()} | {"clips": clips}
    if result["sources"]:
        result["mean"] = {k: float(np.mean([r[k] for r in result["sources"].values()]))
                          for k in ("psnr", "ssim", "bilinear_psnr", "bilinear_ssim")}
    if png and sample_rows:
        write_grid(png, sample_rows)
        result["png"] = png
    return result


def write_grid(path: str, rows, scale: int = 4) -> None:
    """A PNG: for each (name, truth, recon, baseline) [T, H, W, 3] uint8, three strips of frames (original,
    reconstruction, bilinear baseline) one above the other, sources stacked with a gap."""
    from PIL import Image

    blocks = []
    for _, truth, recon, base in rows:
        gap = np.full((2, truth.shape[0] * truth.shape[2], 3), 255, np.uint8)
        strips = [np.concatenate(list(v), axis=1) for v in (truth, recon, base)]
        blocks.append(np.concatenate([strips[0], gap, strips[1], gap, strips[2]], axis=0))
        blocks.append(np.zeros((6, strips[0].shape[1], 3), np.uint8))
    grid = np.concatenate(blocks[:-1], axis=0)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST).save(path)


def main(argv):
    del argv
    cli.require(tokenizer=_TOKENIZER.value, data_root=cli.DATA_ROOT.value)
    from kairos_jax.tokenizer.io import load

    try:
        tok = load(_TOKENIZER.value)
    except (FileNotFoundError, ValueError) as e:
        raise cli.UsageError(f"--tokenizer={_TOKENIZER.value}: {e}") from None
    out = cli.OUT.value
    png = os.path.join(out, "reconstructions.png") if out else None
    result = evaluate_tokenizer(tok, cli.DATA_ROOT.value, clips=flags.FLAGS.clips, clip_frames=_CLIP_FRAMES.value,
                                image_size=_IMAGE_SIZE.value, seed=cli.SEED.value, png=png)
    result["tokenizer"] = _TOKENIZER.value
    line = json.dumps(result)
    if out:
        with open(os.path.join(out, "tokenizer_eval.json"), "w") as f:
            f.write(line + "\n")
    print(line)


def run():
    cli.run(main)


if __name__ == "__main__":
    run()
