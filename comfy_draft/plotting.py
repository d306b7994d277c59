"""Charts as RGB images, drawn with matplotlib (its object API and Agg canvas: no global pyplot state, safe in a
server): the trainer's curves and the benchmarks' comparisons, with real axes and values."""
import numpy as np


def figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width / 100, height / 100), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def rendered(fig):
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def line_chart(series, title="", x_label="step", width=640, height=360):
    """RGB uint8 array; `series` maps label -> (xs, ys), on shared axes."""
    fig = figure(width, height)
    ax = fig.add_subplot()
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.set(title=title, xlabel=x_label)
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize="small")
    return rendered(fig)


def smoothed(values, weight=0.8):
    """Exponential moving average, debiased at the start (as TensorBoard smooths)."""
    out, average = [], 0.0
    for i, v in enumerate(values, 1):
        average = weight * average + (1 - weight) * v
        out.append(average / (1 - weight ** i))
    return out


def curve_panels(history):
    """[title, metric keys] of each panel, as the reward_curve image and the canvas chart draw them: rewards, judges
    and diversity (when validated), gradient norm with the DRaFT+ KL term and DDPO's policy shift (when not zero)."""
    val_keys = sorted({k for m in history for k in m if k.startswith("val_")})
    panels = [["reward", ["reward", "val_reward"]],
              ["judges (held-out)", [k for k in val_keys if k != "val_reward" and "diversity" not in k]],
              ["diversity (held-out)", [k for k in val_keys if "diversity" in k]],
              ["gradient norm / KL", ["grad_norm"] + [k for k in ("kl", "policy_shift")
                                                      if any(m.get(k) for m in history)]]]
    return [[title, keys] for title, keys in panels if keys]


def curve_image(history, kept_step=None, diversity_floor=0.0, width=720, height=None):
    """The training curves in panels with their own axes: reward per step (and smoothed) with the held-out
    reward, judges, diversity against its floor, gradient norm and KL; the kept step marked on each panel."""
    def series(key):
        points = [(m["step"], m[key]) for m in history if key in m and np.isfinite(m[key])]
        return [p[0] for p in points], [p[1] for p in points]

    panels = curve_panels(history)
    fig = figure(width, height or 150 + 170 * len(panels))
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False)[:, 0]
    for ax, (title, keys) in zip(axes, panels):
        for key in keys:
            xs, ys = series(key)
            if key == "reward":
                ax.plot(xs, ys, ".", color="tab:blue", alpha=0.4, label="reward (per step)")
                ax.plot(xs, smoothed(ys), color="tab:blue", label="reward (smoothed)")
            elif xs:
                ax.plot(xs, ys, marker="o" if key.startswith("val_") else None, markersize=4,
                        label=key.replace("val_", "held-out ").replace("_", " "))
        if "val_diversity" in keys and diversity_floor:
            ax.axhline(diversity_floor, color="tab:red", linestyle="--", linewidth=1, label="diversity floor")
        if kept_step is not None:
            ax.axvline(kept_step, color="black", linestyle=":", linewidth=1, label=f"kept (step {kept_step})")
        ax.set_ylabel(title, fontsize="small")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="best")
    axes[0].set_title("DRaFT training")
    axes[-1].set_xlabel("step")
    return rendered(fig)


def image_grid(images, columns, scale=1):
    """(N, 3, H, W) in [0, 1] -> an RGB uint8 array, `columns` per row (the last row padded), scaled up."""
    import torch

    pad = (-len(images)) % columns
    images = torch.cat([images, images.new_zeros(pad, *images.shape[1:])])
    rows = [torch.cat(list(images[i:i + columns]), dim=-1) for i in range(0, len(images), columns)]
    array = (torch.cat(rows, dim=-2).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
    return array.repeat(scale, 0).repeat(scale, 1)


def pareto_chart(points, goal_x=None, goal_y=None, x_label="", y_label="", title="", width=760, height=520):
    """RGB uint8 array: labelled (label, x, y) points, higher is better on both axes, their Pareto front joined by a
    line and the goal region (x >= goal_x and y >= goal_y) shaded."""
    fig = figure(width, height)
    ax = fig.add_subplot()
    if goal_x is not None and goal_y is not None:
        ax.fill_between([goal_x, 1.02], goal_y, 1.02, color="tab:green", alpha=0.15, label="goal")
    front = sorted((p for p in points if not any(q[1] >= p[1] and q[2] >= p[2] and q[1:] != p[1:] for q in points)),
                   key=lambda p: p[1])
    ax.plot([p[1] for p in front], [p[2] for p in front], color="tab:red", lw=1, zorder=1, label="Pareto front")
    for label, x, y in points:
        ax.scatter([x], [y], s=18, zorder=2)
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set(title=title, xlabel=x_label, ylabel=y_label, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return rendered(fig)
