"""ComfyUI nodes: thin declarations that hand off to the comfy_draft library."""
import comfy.model_management
import comfy.utils
import latent_preview

from .comfy_draft.backends import comfyui as backend


class DRaFTDDIMSampler:
    """DDIM (eta = 0) with classifier-free guidance: the exact sampling path DRaFT differentiates."""

    DESCRIPTION = ("Deterministic DDIM sampling (eta 0, 'ddim_uniform' timesteps) with classifier-free guidance. "
                   "It is the sampler DRaFT training backpropagates through; here it runs without gradients.")
    CATEGORY = "DRaFT"
    FUNCTION = "sample"
    RETURN_TYPES = ("LATENT",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "model": ("MODEL", {"tooltip": "An SD1.x, SD2.x or SDXL model (eps or v-prediction)."}),
            "positive": ("CONDITIONING",),
            "negative": ("CONDITIONING",),
            "latent_image": ("LATENT",),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
            "steps": ("INT", {"default": 50, "min": 1, "max": 1000}),
            "cfg": ("FLOAT", {"default": 7.5, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
        }}

    def sample(self, model, positive, negative, latent_image, seed, steps, cfg):
        callback = latent_preview.prepare_callback(model, steps)
        samples = backend.sample(model, positive, negative, latent_image, seed, steps, cfg,
                                 callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED)
        out = {k: v for k, v in latent_image.items() if not k.startswith("downscale_ratio")}
        out["samples"] = samples.to(device=comfy.model_management.intermediate_device(),
                                    dtype=comfy.model_management.intermediate_dtype())
        return (out,)


NODE_CLASS_MAPPINGS = {
    "DRaFTDDIMSampler": DRaFTDDIMSampler,
}
NODE_DISPLAY_NAME_MAPPINGS = {
    "DRaFTDDIMSampler": "DRaFT DDIM Sampler",
}
