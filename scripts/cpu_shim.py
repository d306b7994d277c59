"""Lets PyPI's CUDA torchvision import next to CPU torch (test environment only).

torchvision's compiled extension cannot load against the CPU torch wheel, and its Python code
then fails on `torchvision::nms` being undefined. Declaring the operator schemas before torchvision
is imported makes transforms and models usable (the compiled ops stay unavailable). Installed as a
.pth hook into .venv by scripts/bootstrap.sh; on a machine with matching builds it does nothing
harmful, because it only declares schemas that are missing.
"""
import importlib.abc
import sys


class _TorchvisionShim(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        sys.meta_path.remove(self)
        import torch

        if not torch.cuda.is_available():
            lib = torch.library.Library("torchvision", "FRAGMENT")
            for schema in (
                "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
            ):
                try:
                    lib.define(schema)
                except RuntimeError:
                    pass  # already defined by a working extension
            _TorchvisionShim.lib = lib  # keep the fragment alive
        return None


sys.meta_path.insert(0, _TorchvisionShim())
