"""Data-parallel DRaFT over torch.distributed, with 2 CPU processes on gloo: the same LoRA as one process with
twice the accumulation, rank-0-only files, resume under the same number of processes, and validation decisions
identical on every rank."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from comfy_draft import distributed
from comfy_draft.trainer import step_generator

DIGITS = ["--model", "digits", "--reward", "digit", "--reward-text", "prompted", "--cfg", "1", "--sampling-steps", "4",
          "--prompts", "a 1", "a 7", "--batch-size", "2", "--lr", "3e-3", "--variant", "draft-lv", "--device", "cpu",
          "--val-prompts", "the digit one", "the digit seven", "--val-seeds", "2", "--val-every", "2"]


def run_train(processes, *args, check=True):
    """`python -m comfy_draft train` in 1 process, or in N through torchrun; one thread per process (2 cores)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    result = subprocess.run([sys.executable, *launcher, "-m", "comfy_draft", "train", *DIGITS, *args],
                            capture_output=True, text=True, env=env, timeout=300)
    if check and result.returncode:
        raise AssertionError(result.stdout + result.stderr)
    return result


def interrupt_train(processes, *args, after):
    """Like `run_train`, with Ctrl-C (SIGINT to the launcher's process group, as a terminal sends it) once a line of
    rank 0's output starts with `after`."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    proc = subprocess.Popen([sys.executable, *launcher, "-m", "comfy_draft", "train", *DIGITS, *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    line = ""
    try:
        for line in proc.stdout:
            if line.startswith(after):
                os.killpg(proc.pid, signal.SIGINT)
                break
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    return line + out, err


def trained(out):
    """The last LoRA (float32, from the training state), the saved file's LoRA and the log."""
    state = torch.load(os.path.splitext(out)[0] + ".state.pt", weights_only=True)
    from comfy_draft.lora import load_kohya_file
    log = [json.loads(line) for line in open(os.path.splitext(out)[0] + ".jsonl")]
    return state, load_kohya_file(out), log


def assert_same_lora(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_micro_batch_generators_are_distinct_and_index_0_is_the_old_stream():
    assert step_generator(3, 5).initial_seed() == 3 * 1_000_003 + 5  # single-micro-batch runs are unchanged
    seeds = {step_generator(seed, step, i).initial_seed() for seed in range(3) for step in range(50) for i in range(8)}
    assert len(seeds) == 3 * 50 * 8
    draws = [torch.randn(4, generator=step_generator(0, 1, i)) for i in range(4)]
    assert all(not torch.equal(draws[i], draws[j]) for i in range(4) for j in range(i))


def test_without_a_process_group_everything_is_local():
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    p = torch.nn.Parameter(torch.ones(3))
    p.grad = torch.full((3,), 2.0)
    distributed.average_gradients([p])
    assert torch.equal(p.grad, torch.full((3,), 2.0))
    t = torch.arange(4.0)
    assert distributed.gather(t) is t and distributed.from_main(lambda: 7) == 7


@pytest.mark.slow
def test_two_processes_train_the_lora_of_one_process_with_twice_the_accumulation_and_resume(tmp_path):
    two = tmp_path / "two.safetensors"
    result = run_train(2, "--steps", "4", "--out", str(two))
    assert result.stdout.count("step 1/4") == 1 and "LoRA written" in result.stdout  # rank 0 alone reports
    assert "2 processes on cpu" in result.stdout and "global batch 2 x 2 x 1" in result.stdout
    one = tmp_path / "one.safetensors"
    run_train(1, "--steps", "4", "--accumulation", "2", "--out", str(one))
    (two_state, (two_file, two_meta), two_log), (one_state, (one_file, _), one_log) = trained(two), trained(one)
    assert two_state["processes"] == 2 and two_meta["comfy_draft_processes"] == "2"
    assert_same_lora(two_state["lora"], one_state["lora"])
    assert_same_lora(two_file, one_file)
    assert len(two_log) == len(one_log) == 4
    for a, b in zip(two_log, one_log):  # every rank's rewards count; the gradient is the mean, not the sum
        assert a.keys() == b.keys()
        for key in a.keys() - {"seconds"}:
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key

    # Both ranks drawing rank 0's samples would train one process's LoRA without accumulation: it differs.
    same = tmp_path / "same.safetensors"
    run_train(1, "--steps", "4", "--out", str(same))
    same_state = trained(same)[0]
    assert max((same_state["lora"][k] - two_state["lora"][k]).abs().max() for k in same_state["lora"]) > 1e-4

    # Ctrl-C during a 2-process run (after its first step; up to 30), then resumed to 4: the uninterrupted LoRA.
    part = tmp_path / "part.safetensors"
    _, err = interrupt_train(2, "--steps", "30", "--print-every", "1", "--out", str(part), after="step 1/30")
    stopped = torch.load(tmp_path / "part.state.pt", weights_only=True)["step"]
    assert 1 <= stopped < 4 and f"interrupted at step {stopped}" in err
    assert [p.name for p in tmp_path.glob("part.partial-*")] == [f"part.partial-{stopped}.safetensors"]  # rank 0
    result = run_train(2, "--steps", "4", "--resume", "--out", str(part))
    assert f"step {stopped + 1}/4" in result.stdout and "step 1/" not in result.stdout
    part_state, (part_file, _), part_log = trained(part)
    assert part_state["step"] == 4 and [m["step"] for m in part_log][-1] == 4
    assert_same_lora(part_state["lora"], two_state["lora"])
    assert_same_lora(part_file, two_file)
    assert part_state["validator"]["best"]["step"] == two_state["validator"]["best"]["step"]

    refused = run_train(1, "--steps", "5", "--resume", "--out", str(part), check=False)
    assert refused.returncode and "written by a run with 2 process(es)" in refused.stderr
    assert "--nproc_per_node 2" in refused.stderr and "Traceback" not in refused.stderr


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["diffusers", "comfyui"])
def test_two_processes_with_a_diffusers_folder_and_a_single_file_through_comfyuis_loader(tmp_path, loader):
    from comfyui_harness import COMFY_DIR
    from tiny_diffusers import tiny_pipeline
    from tiny_models import tiny_sd15_checkpoint

    if loader == "diffusers":
        tiny_pipeline(tmp_path).save_pretrained(tmp_path / "pipe")
        model = ["--model", str(tmp_path / "pipe"), "--width", "32", "--height", "32"]
    else:
        model = ["--model", str(tiny_sd15_checkpoint(seed=0)), "--comfyui", str(COMFY_DIR), "--width", "64",
                 "--height", "64", "--variant", "draft-k"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    args = ["-m", "comfy_draft", "train", *model, "--reward", "brightness", "--prompts", "a red square",
            "a blue circle", "--sampling-steps", "3", "--batch-size", "1", "--cfg", "3", "--device", "cpu",
            "--steps", "1"]
    for launcher, extra, out in ((["-m", "torch.distributed.run", "--nproc_per_node", "2"], [], "two"),
                                 ([], ["--accumulation", "2"], "one")):
        command = [sys.executable, *launcher, *args, *extra, "--out", str(tmp_path / f"{out}.safetensors")]
        result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stdout + result.stderr
    two, one = (torch.load(tmp_path / f"{out}.state.pt", weights_only=True) for out in ("two", "one"))
    assert two["processes"] == 2 and one["processes"] == 1
    assert_same_lora(two["lora"], one["lora"])
    assert any(v.abs().max() > 0 for k, v in two["lora"].items() if k.endswith("up"))  # it trained


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(rank, port, folder):
    """One of two gloo processes: the helpers, then a short validated run; writes what it saw to rank-<r>.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    distributed.setup("cpu")
    try:
        from comfy_draft import digits
        from comfy_draft.trainer import TrainConfig, Trainer
        from comfy_draft.validation import FIRST_HELD_OUT_SEED, ValidationConfig, Validator

        # Gradients: averaged; None on every rank stays None; None on one rank counts as zeros there; an fp16
        # overflow (inf) on one rank reaches every rank, so all skip the step.
        a, b, c, d = (torch.nn.Parameter(torch.zeros(2)) for _ in range(4))
        a.grad = torch.full((2,), float(rank + 1))
        if rank == 1:
            c.grad = torch.full((2,), 4.0)
        d.grad = torch.tensor([1.0, float("inf") if rank == 1 else 1.0])
        distributed.average_gradients([a, b, c, d])
        helpers = {"a": a.grad.tolist(), "b": b.grad, "c": c.grad.tolist(), "d": d.grad.tolist(),
                   "gather": distributed.gather(torch.tensor([rank, 10.0 + rank])).tolist(),
                   "from_main": distributed.from_main(lambda: f"made by rank {distributed.rank()}")}

        config = TrainConfig(prompts=["a 1", "a 7"], steps=6, sampling_steps=4, cfg=1.0, width=16, height=16,
                             batch_size=2, lr=3e-2, seed=0)
        validator = Validator(ValidationConfig(prompts=["the digit one", "the digit seven"],
                                               seeds=[FIRST_HELD_OUT_SEED, FIRST_HELD_OUT_SEED + 1], every=1,
                                               criterion="reward", patience=2),
                              {"judge": digits.DigitReward(digits.load_classifier("judge_classifier"))})
        trainer = Trainer(digits.load_backend("cpu"), digits.DigitReward(digits.load_classifier()), config,
                          state_path=os.path.join(folder, f"rank-{rank}.state.pt"), validator=validator)
        trainer.train()
        saved = trainer.save_lora(os.path.join(folder, f"rank-{rank}.safetensors"))
        state = {k: v.tolist() for k, v in trainer.loras.state_dict().items()}
        with open(os.path.join(folder, f"rank-{rank}.json"), "w") as f:
            json.dump({"helpers": helpers, "validations": validator.history, "best": validator.best["step"],
                       "kept": trainer.kept_step, "stopped": trainer.step, "history": trainer.history,
                       "saved": saved is not None, "lora": state}, f)
    finally:
        distributed.shutdown()


@pytest.mark.slow
def test_validation_and_keep_best_are_decided_identically_on_every_rank(tmp_path):
    import torch.multiprocessing as mp

    mp.spawn(worker, args=(free_port(), str(tmp_path)), nprocs=2)
    r0, r1 = (json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1))
    assert r0["helpers"] == r1["helpers"]
    assert r0["helpers"] == {"a": [1.5, 1.5], "b": None, "c": [2.0, 2.0], "d": [1.0, float("inf")],
                             "gather": [0.0, 10.0, 1.0, 11.0], "from_main": "made by rank 0"}
    assert r0["validations"] == r1["validations"] and len(r0["validations"]) >= 3
    assert (r0["best"], r0["kept"], r0["stopped"]) == (r1["best"], r1["kept"], r1["stopped"])
    assert 0 < r0["best"] == r0["kept"] and r0["stopped"] < 6  # a trained LoRA kept, training stopped early
    for m0, m1 in zip(r0["history"], r1["history"]):  # metrics from both ranks' rewards, on both
        assert {k: v for k, v in m0.items() if k != "seconds"} == {k: v for k, v in m1.items() if k != "seconds"}
    assert r0["lora"] == r1["lora"]  # identical updates keep the ranks' LoRAs identical
    assert r0["saved"] and not r1["saved"]  # files from rank 0 only
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".json")) == \
        ["rank-0.safetensors", "rank-0.state.pt"]
