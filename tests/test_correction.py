"""Inverse noise correction (comfy_draft/correction.py): inversion against closed forms and on the flow digit model,
the corrector against a known distribution, its files, and the command line."""
import sys

import pytest
import torch

from comfy_draft import correction, digits
from comfy_draft.sampling import sample_ddim

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1] / "bench"))


def gaussian_flow(mu, c):
    """The exact x0 predictor of data N(mu, c^2 I) under x = (1 - s) x0 + s eps: E[x0 | x] = alpha(s) x + beta(s)."""
    def alpha_beta(s):
        alpha = (1 - s) * c ** 2 / ((1 - s) ** 2 * c ** 2 + s ** 2)
        return alpha, mu - alpha * (1 - s) * mu

    def model(x, sigma):
        alpha, beta = alpha_beta(sigma[0])
        return alpha * x + beta
    return model, alpha_beta


def test_inversion_solves_each_step_exactly_on_the_samplers_grid():
    """On a model whose Euler steps are affine maps (the exact predictor of Gaussian data), each step's inverse is
    one division: the fixed-point inversion must give it, and sampling must return x0 (float64, 1e-10)."""
    model, alpha_beta = gaussian_flow(mu=0.3, c=0.5)
    sigmas = torch.linspace(1, 0, 13, dtype=torch.float64)
    x0 = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 0.5 + 0.3
    x_T, residual = correction.invert(model, x0, sigmas, iterations=200, tolerance=1e-14)

    expected = x0
    for i in reversed(range(12)):  # x_{i+1} = a x_i + b, a = 1 + (1 - alpha) h / s, b = -beta h / s
        s, h = sigmas[i], sigmas[i + 1] - sigmas[i]
        alpha, beta = alpha_beta(s)
        expected = (expected + beta * h / s) / (1 + (1 - alpha) * h / s)
    assert residual <= 1e-14
    assert (x_T - expected).abs().max() < 1e-10
    assert (sample_ddim(model, x_T, sigmas) - x0).abs().max() < 1e-10
    # The same noise is not the inverse on another grid: the corrector belongs to its step count.
    other = torch.linspace(1, 0, 7, dtype=torch.float64)
    assert (sample_ddim(model, x_T, other) - x0).abs().max() > 1e-3


def test_inversion_of_ddim_on_an_eps_model():
    """DDIM on eps/v models is inverted the same way (sigma space: x = x0 + sigma eps). Closed form for Gaussian data
    N(0, c^2 I): x0_hat = c^2 / (c^2 + s^2) x, so each DDIM step multiplies x by (c^2 + s s_next) / (c^2 + s^2), and
    x_T is x0 divided by their product."""
    c = 0.5

    def model(x, sigma):
        return c ** 2 / (c ** 2 + sigma[0] ** 2) * x
    sigmas = torch.cat([torch.logspace(1, -2, 10, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)])
    x0 = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * c
    x_T, _ = correction.invert(model, x0, sigmas, iterations=500, tolerance=1e-15)
    factors = (c ** 2 + sigmas[:-1] * sigmas[1:]) / (c ** 2 + sigmas[:-1] ** 2)
    assert torch.allclose(x_T, x0 / factors.prod(), rtol=1e-9, atol=0)


@pytest.fixture(scope="module")
def flow_digits():
    return digits.load_backend("cpu", "digits-flow")


def test_digit_flow_model_round_trip_and_the_wrong_inverse(flow_digits):
    """Real digits inverted through the flow digit model's own 10-step Euler sampler come back within 5e-3 (relative
    L2 per image; 2e-3 measured, under one grey level in 255 on average). The last step limits it: there the model's
    x0 prediction hardly moves along some directions, and the fixed-point iteration slows to a crawl (1e-2 after 6
    iterations, 2e-3 after 30, 1e-3 after 200; every other step solves to 1e-5 within 30). The usual one-pass
    inversion (each step's velocity taken at the known x_{i+1}, as DDIM inversion does) misses by far more, and so
    would any inverse on a grid the sampler does not take."""
    backend = flow_digits
    images = digits.splits()["diffusion"][0][:8].expand(-1, 3, -1, -1)
    latents = backend.latents_of(images)
    prompts = [""] * len(latents)
    noise, sigmas, residual = correction.invert_latents(backend, latents, prompts, cfg=1.0, steps=10)
    returned = correction.sample_latents(backend, noise, prompts, cfg=1.0, steps=10, grid=sigmas)
    error = correction.relative_error(returned, latents)
    assert residual <= 5e-3 and error < 5e-3, (residual, error)
    assert abs(noise.std().item() - 1) < 0.3  # it is noise

    def one_pass(model, x, sigmas):
        for i in reversed(range(len(sigmas) - 1)):
            h = sigmas[i + 1] - sigmas[i]
            s_at = sigmas[i + 1].clamp_min(1e-3)
            x = x - h * (x - model(x, s_at * x.new_ones(len(x)))) / s_at
        return x
    out = {}
    backend.run(lambda model, x, sigmas: out.update(x_T=one_pass(model, latents, sigmas)) or x, prompts, "", 1.0,
                torch.ones(latents.shape), 10)
    naive = correction.sample_latents(backend, out["x_T"], prompts, cfg=1.0, steps=10)
    print(f"round trip {error:.2g}, one-pass inversion {correction.relative_error(naive, latents):.2g}")
    assert correction.relative_error(naive, latents) > 10 * error
    with pytest.raises(ValueError, match="another step grid"):
        correction.sample_latents(backend, noise, prompts, cfg=1.0, steps=12, grid=sigmas)


def test_corrector_learns_a_shifted_gaussian_and_its_file_round_trips(tmp_path):
    """Trained on noises from N(0.5, 0.6^2), the corrector carries N(0, 1) there: the mean within 0.05, the std
    within 0.15 (a short training's flow still under-spreads a little: 0.52 measured)."""
    target = torch.randn(512, 1, 4, 4, generator=torch.Generator().manual_seed(2)) * 0.6 + 0.5
    corrector = correction.train_corrector(target, width=8, steps=300, batch_size=128, lr=3e-3, seed=0)
    z = torch.randn(2000, 1, 4, 4, generator=torch.Generator().manual_seed(3))
    q = corrector.sample(z, 10)
    assert abs(q.mean().item() - 0.5) < 0.05 and abs(q.std().item() - 0.6) < 0.15, (q.mean(), q.std())

    path = tmp_path / "c.safetensors"
    sigmas = torch.linspace(1, 0, 5, dtype=torch.float64)
    correction.save_corrector(path, corrector, sigmas, {"model": "test", "steps": 4, "cfg": 1.0})
    loaded, loaded_sigmas, info = correction.load_corrector(path)
    assert torch.equal(loaded.sample(z[:4], 3), corrector.sample(z[:4], 3)) and torch.equal(loaded_sigmas, sigmas)
    assert info["steps"] == 4 and info["shape"] == [1, 4, 4]
    correction.save_noise(tmp_path / "n.safetensors", target, sigmas, {"steps": 4})
    with pytest.raises(ValueError, match="not a comfy-draft corrector file"):
        correction.load_corrector(tmp_path / "n.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a safetensors file"):
        correction.load_corrector(tmp_path / "junk.safetensors")
    with pytest.raises(ValueError, match="even noise sides"):
        correction.Corrector((4, 5, 6))


def test_frechet_distance_against_scipy():
    import numpy as np
    from correction import frechet_distance
    from scipy import linalg
    g = torch.Generator().manual_seed(4)
    a = torch.randn(400, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    b = torch.randn(300, 6, generator=g, dtype=torch.float64) + 0.5
    ca, cb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    expected = (np.sum((a.numpy().mean(0) - b.numpy().mean(0)) ** 2) + np.trace(ca) + np.trace(cb)
                - 2 * np.trace(linalg.sqrtm(ca @ cb).real))
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    assert frechet_distance(a, a) == pytest.approx(0, abs=1e-9)


def test_command_line_invert_train_sample(tmp_path, capsys):
    from PIL import Image

    from comfy_draft import cli
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(digits.splits()["diffusion"][0][:6]):
        Image.fromarray((image[0].numpy() * 255).round().astype("uint8")).save(folder / f"{i}.png")
    (folder / "notes.txt").write_text("not an image")
    noise, corrector, grid = tmp_path / "noise.safetensors", tmp_path / "corrector.safetensors", tmp_path / "grid.png"
    model = ["--model", "digits-flow", "--device", "cpu"]
    cli.main(["correct-noise", "invert", *model, "--images", str(folder), "--steps", "4", "--out", str(noise)])
    assert "6 noises" in capsys.readouterr().out
    cli.main(["correct-noise", "train", "--noise", str(noise), "--out", str(corrector), "--width", "8",
              "--training-steps", "3", "--batch-size", "4", "--device", "cpu"])
    assert correction.load_corrector(corrector)[2]["steps"] == 4
    cli.main(["correct-noise", "sample", *model, "--corrector", str(corrector), "--seeds", "3", "--corrector-steps",
              "2", "--out", str(grid)])
    assert Image.open(grid).size == (3 * 16 * 8, 2 * 16 * 8)  # 3 seeds, two rows, scaled to 128 px
    with pytest.raises(SystemExit, match="not a comfy-draft noise file"):
        cli.main(["correct-noise", "train", "--noise", str(corrector), "--out", str(tmp_path / "x.safetensors")])
