"""The bundled digit model and classifiers (comfy_draft/assets), and the demo command."""
import json
import subprocess
import sys

import pytest

from comfy_draft import digits
from comfy_draft.demo import evaluate


def test_digit_prompts():
    assert [digits.digit_of(p) for p in ["7", "a 7", "the digit seven", "Digit 0", "", "nine"]] == [7, 7, 7, 0, None, 9]
    with pytest.raises(ValueError, match="exactly one digit"):
        digits.digit_of("a 3 or a 5")
    with pytest.raises(ValueError, match="exactly one digit"):
        digits.digit_of("a cat")


@pytest.mark.slow
@pytest.mark.parametrize("model", ["digits", "digits-flow"])
def test_base_model_draws_the_prompted_digit_as_judged_by_an_unseen_classifier(model):
    """The judge was trained on real digits that neither the diffusion models nor the reward saw. (DDIM on the DDPM
    model, Euler on the rectified flow, both at 20 steps and cfg 3.)"""
    backend = digits.load_backend("cpu", model)
    assert backend.flow == (model == "digits-flow")
    judge = digits.load_classifier("judge_classifier")
    reward = digits.DigitReward(digits.load_classifier("reward_classifier"))
    result, images = evaluate(backend, reward, judge, [f"the digit {w}" for w in digits.WORDS], range(500, 510),
                              cfg=3.0, steps=20, target=None)
    print(f"{model} base model: judge accuracy on prompted digit {result['judge_accuracy']:.0%}, reward {result['reward']:+.3f}")
    assert images.shape == (100, 3, 16, 16)
    assert result["judge_accuracy"] >= 0.8


@pytest.mark.slow
def test_demo_command_trains_and_writes_its_outputs(tmp_path):
    out = tmp_path / "demo"
    result = subprocess.run([sys.executable, "-m", "comfy_draft", "demo", "--out", str(out), "--steps", "3",
                             "--sampling-steps", "6"], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "before: held-out reward" in result.stdout and "after 3 steps" in result.stdout
    assert "confidently a digit" in result.stdout  # the judge's verdict
    assert "training on " in result.stdout  # names the default control's reward
    for name in ("digits_draft.safetensors", "reward_curve.png", "before_after.png", "digits_draft.jsonl",
                 "digits_draft.state.pt", "summary.json"):
        assert (out / name).stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"before", "after", "config"}
    assert len((out / "digits_draft.jsonl").read_text().splitlines()) == 3


@pytest.mark.slow
def test_quality_benchmark_runs_end_to_end_with_a_tiny_budget(tmp_path):
    from ui_workflows import REPO
    result = subprocess.run([sys.executable, str(REPO / "bench" / "quality.py"), "--queries", "16", "--seeds", "0",
                             "--no-gradient-queries", "16", "--eval-seeds", "2", "--hit-eval-seeds", "2",
                             "--evals", "1",
                             "--sampling-steps", "5", "--batch-size", "2", "--tables", "differentiable", "jpeg",
                             "--methods", "DRaFT-LV (n=2)", "DRaFT-1", "DRaFT-K (K=2)", "DRaFT-K (K=5)",
                             "DRaFT (full)", "DDPO", "P-GRAFT (t = 0.5)",  # every kind of method, not every method
                             "--strengths", "0", "1", "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("quality.json", "quality.md", "quality_reward_vs_queries.png", "quality_grad_norm_vs_k.png",
                 "quality_lora_strength.png", "quality_jpeg.md"):
        assert (tmp_path / name).stat().st_size > 0
    assert "| DRaFT-LV (n=2) |" in (tmp_path / "quality.md").read_text()


@pytest.mark.parametrize("variant", ["draft", "draft-lv", "pgraft"])
def test_flow_digit_model_trains_unchanged(variant):
    """DRaFT, DRaFT-LV and P-GRAFT on the rectified-flow digit model through the library as on the DDPM one: the
    re-noising and P-GRAFT's targets use the flow's own forward process (the backend's `noised`)."""
    import torch

    from comfy_draft.trainer import TrainConfig, Trainer
    backend = digits.load_backend("cpu", "digits-flow")
    x0, eps, sigma = torch.zeros(1, 1, 2, 2), torch.ones(1, 1, 2, 2), torch.tensor(0.25)
    assert torch.equal(backend.noised(x0 + 2, sigma, eps), torch.full((1, 1, 2, 2), 0.75 * 2 + 0.25))
    config = TrainConfig(prompts=["a 3"], variant=variant, steps=2, sampling_steps=4, width=16, height=16,
                         batch_size=2, cfg=3.0, seed=0, samples_per_prompt=2, accepted_per_prompt=1)
    trainer = Trainer(backend, digits.DigitReward(digits.load_classifier(), 8), config)
    trainer.train()
    assert len(trainer.history) == 2 and all(torch.isfinite(torch.tensor(m["loss"])) for m in trainer.history)
    assert any(lora.up.abs().sum() > 0 for lora in trainer.loras.values())  # moved off the base model (up = 0)
