"""One training run, from its memory check to its last file: the same for the node, the command line and the demo,
which only map their inputs to `RunFiles` and `run` and report.

The files of a run, all named from the LoRA's path without `.safetensors` (`<stem>`):
  <stem>.safetensors               the LoRA (with keep-best validation, the best validated one)
  <stem>.step-<N>.safetensors      a snapshot every `save_every` steps (with the training state)
  <stem>.partial-<N>.safetensors   the LoRA reached at step N when the run was interrupted
  <stem>.state.pt                  the training state, to resume exactly (`Trainer.save_state`)
  <stem>.jsonl                     one line of metrics per step
The state and the log sit beside the LoRA unless `folder` says otherwise: the node keeps them in
output/draft_training/, because ComfyUI's LoRA loaders list every .pt file of the loras folder.
"""
import dataclasses
import json
import logging
import os

from . import distributed, memory
from .lora import load_kohya_file


@dataclasses.dataclass(frozen=True)
class RunFiles:
    lora: str            # the final LoRA's path
    folder: str = None   # where the state and the log go (default: beside the LoRA)

    @property
    def stem(self):
        return self.lora[:-len(".safetensors")] if self.lora.endswith(".safetensors") else self.lora

    def snapshot(self, step):
        return f"{self.stem}.step-{step}.safetensors"

    def partial(self, step):
        return f"{self.stem}.partial-{step}.safetensors"

    def beside_state(self, suffix):
        return os.path.join(self.folder or os.path.dirname(self.stem), os.path.basename(self.stem) + suffix)

    @property
    def state(self):
        return self.beside_state(".state.pt")

    @property
    def log(self):
        return self.beside_state(".jsonl")


def log_of(state):
    """The log that goes on with a resumed state: the one beside it."""
    return state[:-len(".state.pt")] + ".jsonl" if state.endswith(".state.pt") else None


def run(trainer, files, resume=None, init_lora=None, make_room=None, interrupts=(KeyboardInterrupt,), saved=None):
    """Train `trainer` (a `trainer.Trainer`) to its last step and write the run's files; returns the LoRA's path.

    resume: a training state to continue exactly (the same settings; it and the log beside it go on), or
    init_lora: a LoRA file to start from at step 0. make_room(estimate): called with the step's memory estimate
    before training (the node asks ComfyUI to evict cached models). interrupts: the exceptions that stop a run on
    the user's request: the LoRA reached so far is written (`RunFiles.partial`) before they propagate; the state is
    written on any stop. saved(path): called after each snapshot and the final LoRA is written (the node's previews).
    Under torch.distributed every process runs this; only rank 0 writes files.
    """
    estimate = trainer.memory_estimate()  # MemoryError when it cannot fit
    logging.info("DRaFT: %s", memory.describe(estimate))
    if make_room is not None:
        make_room(estimate)
    trainer.state_path = resume or files.state
    if resume:
        trainer.load_state(resume)  # refuses a state made with other settings, naming them
    elif init_lora:
        trainer.loras.load_kohya_state_dict(load_kohya_file(init_lora)[0], init_lora)
    log_path = (resume and log_of(resume)) or files.log
    if distributed.is_main():
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log = open(log_path, "a" if resume else "w") if distributed.is_main() else None
    save_every, steps = trainer.config.save_every, trainer.config.steps

    def record(metrics, images):  # before the front end's callbacks: one of them may stop the run
        if log is not None:
            log.write(json.dumps(metrics) + "\n")
            log.flush()
        step = metrics["step"]
        if save_every and step % save_every == 0 and step < steps:
            written(trainer.save_lora(files.snapshot(step), overwrite=True))

    def written(path):
        if path is not None and saved is not None:
            saved(path)

    trainer.callbacks.insert(0, record)
    try:
        trainer.train()
    except interrupts:
        if trainer.step:
            trainer.save_lora(files.partial(trainer.step), overwrite=True)
        raise
    finally:
        trainer.callbacks.remove(record)
        if log is not None:
            log.close()
    path = trainer.save_lora(files.lora, overwrite=True)
    written(path)
    return files.lora
