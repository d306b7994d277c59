"""Line charts as images (PIL only): the trainer's reward curve and the benchmark's comparisons."""
import numpy as np
from PIL import Image, ImageDraw

COLOURS = [(40, 120, 220), (220, 90, 40), (60, 160, 60), (150, 60, 180), (200, 160, 20), (20, 170, 170),
           (120, 120, 120), (200, 60, 120)]


def line_chart(series, title="", x_label="step", width=640, height=360):
    """RGB uint8 array; `series` maps label -> (xs, ys), drawn on shared axes."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 70, 30, width - 20, height - 40 - 14 * ((len(series) + 2) // 3)
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    draw.text((left, 8), title, fill="black")
    points = [(x, y) for xs, ys in series.values() for x, y in zip(xs, ys) if np.isfinite(y)]
    if not points:
        return np.array(image)
    x_lo, x_hi = min(p[0] for p in points), max(p[0] for p in points)
    y_lo, y_hi = min(p[1] for p in points), max(p[1] for p in points)
    x_span, y_span = (x_hi - x_lo) or 1.0, (y_hi - y_lo) or 1.0

    def at(x, y):
        return left + (right - left) * (x - x_lo) / x_span, bottom - (bottom - top) * (y - y_lo) / y_span

    for i, (label, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        xy = [at(x, y) for x, y in zip(xs, ys) if np.isfinite(y)]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=colour)
        draw.text((left + 200 * (i % 3), bottom + 24 + 14 * (i // 3)), label, fill=colour)
    draw.text((4, top), f"{y_hi:.3g}", fill="black")
    draw.text((4, bottom - 10), f"{y_lo:.3g}", fill="black")
    draw.text((left, bottom + 6), f"{x_label} {x_lo:g}", fill="black")
    draw.text((right - 90, bottom + 6), f"{x_label} {x_hi:g}", fill="black")
    return np.array(image)


def curve_image(history, width=640, height=360):
    """The training curve: reward, loss and gradient norm per step, and the validation metrics (`val_*`)
    at the steps that have them, each scaled to the panel (its range is in its label)."""
    keys = ["reward", "loss", "grad_norm"] + sorted({k for m in history for k in m if k.startswith("val_")})
    series = {}
    for key in keys:
        steps = [m["step"] for m in history if key in m]
        values = np.array([m[key] for m in history if key in m], dtype=float)
        finite = values[np.isfinite(values)]
        lo, hi = (finite.min(), finite.max()) if len(finite) else (0.0, 1.0)
        series[f"{key} [{lo:.3g}, {hi:.3g}]"] = (steps, (values - lo) / ((hi - lo) or 1.0))
    return line_chart(series, "training curve (each series scaled to its range)", "step", width, height)


def image_grid(images, columns, scale=1):
    """(N, 3, H, W) in [0, 1] -> an RGB uint8 array, `columns` per row (the last row padded), scaled up."""
    import torch

    pad = (-len(images)) % columns
    images = torch.cat([images, images.new_zeros(pad, *images.shape[1:])])
    rows = [torch.cat(list(images[i:i + columns]), dim=-1) for i in range(0, len(images), columns)]
    array = (torch.cat(rows, dim=-2).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return array.repeat(scale, 0).repeat(scale, 1)
