"""Frame quality against the ground truth: PSNR and SSIM of uint8 (or float) images, numpy float64."""

from __future__ import annotations

import math

import numpy as np


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB of two images (inf when identical)."""
    mse = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-x * x / (2 * sigma * sigma))
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of [H, W] with the 1-D window w along both axes."""
    n = w.size
    rows = sum(w[i] * x[i:x.shape[0] - n + 1 + i] for i in range(n))
    return sum(w[i] * rows[:, i:rows.shape[1] - n + 1 + i] for i in range(n))


def ssim(a: np.ndarray, b: np.ndarray, peak: float = 255.0) -> float:
    """Structural similarity (Wang et al. 2004): 11 x 11 Gaussian window (sigma 1.5), K1 = 0.01,
    K2 = 0.03, mean over valid window positions and channels. a, b: [H, W] or [H, W, C]; images
    smaller than the window use a window of their size."""
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    size = min(11, a.shape[0], a.shape[1])
    w = _gaussian_window(size, 1.5)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    out = []
    for ch in range(a.shape[-1]):
        x, y = a[..., ch], b[..., ch]
        mx, my = _filter_valid(x, w), _filter_valid(y, w)
        vx = _filter_valid(x * x, w) - mx * mx
        vy = _filter_valid(y * y, w) - my * my
        cxy = _filter_valid(x * y, w) - mx * my
        s = ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
        out.append(s.mean())
    return float(np.mean(out))
