"""What inference writes for people to look at: H.264 videos (PyAV) and line plots (PNG, PIL)."""

from __future__ import annotations

import math

import numpy as np


def write_side_by_side_mp4(path: str, truth: np.ndarray, pred: np.ndarray, fps: float, scale: int = 4) -> None:
    """uint8 [T, H, W, 3] ground truth (left) and prediction (right), upscaled x scale, H.264."""
    write_mp4(path, np.concatenate([truth, np.zeros_like(truth[:, :, :2]), pred], axis=2), fps, scale)


def write_mp4(path: str, frames: np.ndarray, fps: float, scale: int = 1) -> None:
    """uint8 [T, H, W, 3] frames, upscaled x scale (nearest), H.264 (PyAV)."""
    import av

    frames = frames.repeat(scale, axis=1).repeat(scale, axis=2)
    H, W = frames.shape[1:3]
    frames = np.pad(frames, ((0, 0), (0, H % 2), (0, W % 2), (0, 0)))
    with av.open(path, "w") as container:
        stream = container.add_stream("libx264", rate=max(1, round(fps)))
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "12"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def plot_series(path: str, panels: list[dict], title: str, width: int = 640, panel_height: int = 200) -> None:
    """A PNG of line plots drawn with PIL: panels = [{"label": str, "series": [(name, [y...], rgb)]}]."""
    from PIL import Image, ImageDraw

    margin_l, margin_r, margin_t, gap = 60, 110, 28, 30
    height = margin_t + len(panels) * (panel_height + gap)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    draw.text((margin_l, 6), title, fill="black")
    for p, panel in enumerate(panels):
        top = margin_t + p * (panel_height + gap)
        x0, x1, y0, y1 = margin_l, width - margin_r, top + 14, top + panel_height
        values = [v for _, ys, _ in panel["series"] for v in ys if math.isfinite(v)]
        lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
        if hi - lo < 1e-9:
            lo, hi = lo - 0.5, hi + 0.5
        n = max(len(ys) for _, ys, _ in panel["series"])
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text((x0, top), panel["label"], fill="black")
        draw.text((4, y0), f"{hi:.3g}", fill="black")
        draw.text((4, y1 - 10), f"{lo:.3g}", fill="black")
        draw.text((x0, y1 + 2), "step 0", fill="black")
        draw.text((x1 - 40, y1 + 2), f"{n - 1}", fill="black")
        for s, (name, ys, color) in enumerate(panel["series"]):
            pts = [(x0 + (x1 - x0) * i / max(n - 1, 1), y1 - (y1 - y0) * (v - lo) / (hi - lo))
                   for i, v in enumerate(ys) if math.isfinite(v)]
            if len(pts) > 1:
                draw.line(pts, fill=color, width=2)
            for x, y in pts:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            draw.text((x1 + 8, y0 + 14 * s), name, fill=color)
    img.save(path, format="PNG")
