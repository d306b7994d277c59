"""Data-parallel DRaFT over torch.distributed, for runs launched by torchrun (`torchrun --nproc_per_node N -m
comfy_draft train ...`): NCCL with one GPU per process (cuda:LOCAL_RANK), gloo on the CPU.

Every process holds the whole model and the same LoRA; each draws its own micro-batches (see
`trainer.step_generator`), and after a step's micro-batches the LoRA gradients are averaged by one explicit
all-reduce of their flattened concatenation. Not DistributedDataParallel: the backward passes run inside the
backends' sampling calls (ComfyUI's guider, recomputed recomputation, several model calls per backward),
on LoRAs patched into a model the trainer does not own, and LoRA gradients are small enough (megabytes) that
DDP's overlap of communication with backward would buy little. Identical gradients on every process give
identical AdamW steps, so the LoRAs stay identical without broadcasting weights.

Without torchrun (or with one process) every function here is a no-op and the trainer runs as before.
"""
import datetime
import os

import torch
import torch.distributed as dist

TIMEOUT = datetime.timedelta(hours=1)  # the other processes wait this long for rank 0's validation


def launched():
    """True in a process that torchrun started as one of several."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active():
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size():
    return dist.get_world_size() if active() else 1


def rank():
    return dist.get_rank() if active() else 0


def is_main():
    """Rank 0: the process that logs, previews and writes files."""
    return rank() == 0


def setup(device=None):
    """Join torchrun's process group; returns this process's device: cuda:LOCAL_RANK on GPUs (set as the current
    device, which ComfyUI's loader follows), else the CPU. An explicit GPU index is refused: torchrun assigns them."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is not None:
            raise ValueError(f"--device {device}: under torchrun give --device cuda; process i uses cuda:LOCAL_RANK")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ValueError(f"--device {device}: several processes run on CUDA GPUs (NCCL) or the CPU (gloo)")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT,
                            **({"device_id": device} if device.type == "cuda" else {}))
    return str(device)


def shutdown(wait=True):
    """Leave the process group; with `wait`, once every process has finished (a gloo process that exits while rank 0
    still writes its files was seen to abort: "terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def average_gradients(params):
    """Average the parameters' gradients over all processes with one all-reduce. A gradient that is None on every
    process stays None (AdamW then skips the parameter, as in a single process); one that is None on some only
    counts as zeros there."""
    if not active():
        return
    ref = params[0]
    grads = [p.grad.flatten() if p.grad is not None else ref.new_zeros(p.numel()) for p in params]
    present = torch.tensor([p.grad is not None for p in params], dtype=ref.dtype, device=ref.device)
    flat = torch.cat([*grads, present])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    present = flat[-len(params):] > 0
    for p, g, has in zip(params, flat[:-len(params)].split([p.numel() for p in params]), present.tolist()):
        p.grad = g.view_as(p) if has else None


def gather(t):
    """Every process's `t` (same shape everywhere), concatenated in rank order along the first dimension."""
    if not active():
        return t
    rows = t.new_zeros(dist.get_world_size(), *t.shape)
    rows[dist.get_rank()] = t
    dist.all_reduce(rows)  # a sum of one non-zero row each: gloo and NCCL both have it, unlike all_gather_into_tensor
    return rows.flatten(0, 1)


def from_main(fn):
    """fn() run on rank 0 only, its (picklable) result sent to every process."""
    if not active():
        return fn()
    box = [fn() if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]
