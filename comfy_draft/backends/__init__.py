"""The backend contract: what `Trainer`, `memory` and `validation` call on a model. Two implementations,
`backends.comfyui.TrainingBackend` (ComfyUI's MODEL / CLIP / VAE) and `backends.diffusers.TrainingBackend`."""
import contextlib
import typing

import torch


@typing.runtime_checkable
class Backend(typing.Protocol):
    """A diffusion model, its text conditioning and its decoder, seen as DRaFT needs them.

    `model(x, sigma) -> x0_hat` inside `run` is the CFG-guided x0 predictor that `sampling.sample_ddim`
    steps along; gradients flow from `decode`'s images to the LoRA weights that `add_loras` attached.
    """

    device: torch.device
    base_model_version: str     # kohya's ss_base_model_version
    compute_dtype: torch.dtype  # the model's native compute dtype (what `precision="auto"` follows on a GPU)
    loras: typing.Any           # the LoRASet of `add_loras`, or None before
    flow: bool                  # a flow-matching model (its DDIM step is the Euler step of its ODE)

    def add_loras(self, rank: int, alpha: float | None = None, resnets: bool = False):
        """Attach trainable LoRAs (a `lora.LoRASet`, returned) to the UNet; the base weights stay frozen."""

    def noised(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x0 at noise level `sigma` (a number, or one per sample) with unit noise `eps`, by the model's own forward
        process: `sampling.noised` (x0 + sigma eps) for eps/v models, (1 - sigma) x0 + sigma eps for flow models."""

    def latents_of(self, images: torch.Tensor) -> torch.Tensor:
        """The model-space latents (what `decode` takes) of images (B, 3, H, W) in [0, 1] (noise correction)."""

    def latent_shape(self, batch: int, height: int, width: int) -> tuple:
        """The start-noise shape for `batch` images of height x width pixels."""

    def run(self, fn, prompts: list, negative_prompt: str, cfg: float, noise: torch.Tensor, steps: int,
            recompute: bool = False):
        """`fn(model, x_T, sigmas)` with the guided x0 predictor for `prompts` and the DDIM schedule of `steps`.

        recompute: every model call made with gradient keeps only its inputs and is recomputed in backward
        (the backend decides where: around the guided call, or around each UNet call inside it); "blocks": also
        each UNet block inside that (`blockwise.UNET_BLOCKS`), for models whose one call does not fit.
        """

    def decode(self, x0: torch.Tensor, recompute: bool = True) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1], differentiable in x0; with `recompute` the decoder is recomputed in
        backward one image at a time, one block at a time (`blockwise.per_image`)."""

    def modules(self) -> list:
        """The modules whose weights sit on the device while training (for memory estimates)."""

    def session(self) -> contextlib.AbstractContextManager:
        """The whole training run's context: models loaded once for all its steps, released at the end."""
