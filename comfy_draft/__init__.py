"""comfy-draft: DRaFT reward fine-tuning. The library knows nothing of ComfyUI's UI."""
