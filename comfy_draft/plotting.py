"""A reward curve as an image (PIL only), for the trainer node's IMAGE output and the CLI."""
import numpy as np
from PIL import Image, ImageDraw

SERIES = (("reward", (40, 120, 220)), ("loss", (220, 90, 40)), ("grad_norm", (60, 160, 60)))


def curve_image(history, width=640, height=360):
    """RGB uint8 array of reward (left axis) per step; loss and gradient norm scaled to share the panel."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, top, right, bottom = 60, 30, width - 20, height - 40
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    steps = [m["step"] for m in history]
    if not steps:
        draw.text((left + 10, top + 10), "no steps", fill="black")
        return np.asarray(image)
    x_of = (lambda s: left + (right - left) * (s - steps[0]) / max(1, steps[-1] - steps[0]))
    for i, (key, colour) in enumerate(SERIES):
        values = np.array([m[key] for m in history], dtype=float)
        lo, hi = float(values.min()), float(values.max())
        span = hi - lo or 1.0
        points = [(x_of(s), bottom - (bottom - top) * (v - lo) / span) for s, v in zip(steps, values)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=3 if key == "reward" else 1)
        else:
            draw.ellipse((points[0][0] - 3, points[0][1] - 3, points[0][0] + 3, points[0][1] + 3), fill=colour)
        draw.text((left + 5 + 190 * i, 8), f"{key} {values[-1]:.4g} [{lo:.3g}, {hi:.3g}]", fill=colour)
    draw.text((left, bottom + 8), f"step {steps[0]}", fill="black")
    draw.text((right - 70, bottom + 8), f"step {steps[-1]}", fill="black")
    return np.asarray(image)
