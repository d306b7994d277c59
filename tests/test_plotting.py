"""The training curve as an image: one panel per kind of metric, with matplotlib's axes."""
import numpy as np

from comfy_draft.plotting import curve_image, curve_panels


def history(validated):
    steps = [{"step": i, "reward": 0.1 * i, "grad_norm": 1.0 / i, "kl": 0.0} for i in range(1, 11)]
    if validated:
        for m in steps[4::5]:
            m.update(val_reward=0.5, val_judge_1=-1.0, val_diversity=0.9, val_feature_diversity=0.95)
    return steps


def test_panels_follow_the_metrics_present():
    assert curve_panels(history(False)) == [["reward", ["reward", "val_reward"]], ["gradient norm / KL", ["grad_norm"]]]
    assert [keys for _, keys in curve_panels(history(True))] == [["reward", "val_reward"], ["val_judge_1"],
                                                                ["val_diversity", "val_feature_diversity"], ["grad_norm"]]
    with_kl = [dict(m, kl=0.5) for m in history(False)]
    assert curve_panels(with_kl)[-1] == ["gradient norm / KL", ["grad_norm", "kl"]]


def test_curve_renders_one_panel_height_per_panel():
    plain, validated = curve_image(history(False)), curve_image(history(True), kept_step=5, diversity_floor=0.75)
    assert plain.shape == (150 + 2 * 170, 720, 3) and validated.shape == (150 + 4 * 170, 720, 3)
    assert plain.dtype == np.uint8 and len(np.unique(plain.reshape(-1, 3), axis=0)) > 20  # drawn, not blank
