"""Adapters from model ecosystems (ComfyUI, diffusers) to the library's `model(x, sigma) -> x0_hat` interface."""
