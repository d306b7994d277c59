"""Loading reward weights from local files, safely and with errors that say what went wrong."""
import os
import pickle

import torch


class RewardFileError(ValueError):
    pass


def load_state_dict(path, expected, allow_unsafe_pickle=False):
    """A state dict from a `.safetensors`, `.pt`/`.pth`/`.bin` or TorchScript file.

    `expected` describes the file wanted (for error messages). Pickles load with
    `weights_only=True` unless `allow_unsafe_pickle` (only for files you trust).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise RewardFileError(f"reward file not found: {path} (expected {expected})")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as e:
            raise RewardFileError(f"{path} is not a valid safetensors file (expected {expected}): {e}") from e
    with open(path, "rb") as f:
        head = f.read(64).lstrip()
    if head[:1] == b"<":
        raise RewardFileError(f"{path} is an HTML/XML page, not model weights (a failed download?); expected {expected}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not allow_unsafe_pickle, mmap=False)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise RewardFileError(
                f"{path} contains Python objects other than tensors, which are not loaded by default because "
                f"unpickling can run code; expected {expected}. If you trust this file, load it with "
                f"allow_unsafe_pickle=True.") from e
        raise RewardFileError(f"{path} is not a PyTorch checkpoint (expected {expected}): {e}") from e
    except RuntimeError as e:
        if "TorchScript" in str(e) or "constants.pkl" in str(e):  # a JIT archive (e.g. OpenAI's CLIP .pt)
            return torch.jit.load(path, map_location="cpu").state_dict()
        raise RewardFileError(f"{path} could not be read as a PyTorch checkpoint (expected {expected}): {e}") from e
    if isinstance(obj, torch.jit.ScriptModule):  # weights_only=False hands TorchScript archives to torch.jit.load
        return obj.state_dict()
    return obj


def unwrap(state_dict, *keys):
    """Follow wrapper keys such as {'state_dict': ...} when present."""
    for key in keys:
        if isinstance(state_dict, dict) and key in state_dict and isinstance(state_dict[key], dict):
            state_dict = state_dict[key]
    return state_dict


def strip_prefix(state_dict, prefix):
    if all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return state_dict


def require_keys(state_dict, keys, path, expected):
    """Raise naming the file and the family when `state_dict` lacks the keys that identify it."""
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise RewardFileError(f"{path} does not hold a dict of tensors; expected {expected}")
    missing = [k for k in keys if k not in state_dict]
    if missing:
        sample = ", ".join(list(state_dict)[:4])
        raise RewardFileError(f"{path} does not look like {expected}: it lacks {missing[:3]} (its keys start: {sample})")
