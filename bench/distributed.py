"""1 process vs N processes (torch.distributed, gloo on the CPU) at the same global batch, on the bundled digit model.

Not a test: it times `python -m comfy_draft train` three ways at one global batch (batch_size x processes x
accumulation): one process with `--accumulation N` on 1 thread and on N threads, and N processes (torchrun) with
accumulation 1 on 1 thread each. It reports the median step time from the training log (rank 0's, which includes
the all-reduce) and the command's wall time (process start, model load, validation-free training, saving). On a
CPU the processes share the machine's cores, so this shows the cost of the collective and of process start-up,
not a GPU speed-up. Writes bench/results/distributed_cpu.{json,md}.

Run: .venv/bin/python bench/distributed.py [--processes 2] [--steps 12]
"""
import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(processes, threads, accumulation, args, folder):
    out = pathlib.Path(folder) / f"p{processes}_t{threads}.safetensors"
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes)] if processes > 1 else []
    command = [sys.executable, *launcher, "-m", "comfy_draft", "train", "--model", "digits", "--reward", "digit",
               "--reward-text", "prompted", "--prompts", "a 1", "a 7", "--cfg", "1", "--device", "cpu",
               "--sampling-steps", str(args.sampling_steps), "--batch-size", str(args.batch_size),
               "--accumulation", str(accumulation), "--steps", str(args.steps), "--out", str(out), "--overwrite"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    load = os.getloadavg()[0]  # other work on the machine skews CPU timings: recorded with each row
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=ROOT, capture_output=True)
    wall = time.perf_counter() - started
    log = [json.loads(line) for line in out.with_suffix(".jsonl").read_text().splitlines()]
    steps = [m["seconds"] for m in log[args.warmup:]]
    return {"processes": processes, "threads_per_process": threads, "accumulation": accumulation,
            "median_step_s": statistics.median(steps), "wall_s": wall, "load_before": load}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the median")
    p.add_argument("--batch-size", type=int, default=4, help="per process and micro-batch")
    p.add_argument("--sampling-steps", type=int, default=20)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    n = args.processes
    with tempfile.TemporaryDirectory() as folder:
        rows = [run(1, 1, n, args, folder), run(1, n, n, args, folder), run(n, 1, 1, args, folder)]
    base = rows[0]["median_step_s"]
    for row in rows:
        row["speedup_vs_1x1"] = base / row["median_step_s"]
    info = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (CPU, gloo)",
            "global_batch": f"{args.batch_size} x {n}", "variant": "draft-lv (n = 2)",
            "sampling_steps": args.sampling_steps, "steps": args.steps, "warmup": args.warmup, "rows": rows}
    lines = [f"Digit model (16 x 16), draft-lv, {args.sampling_steps} sampling steps, global batch "
             f"{args.batch_size} x {n} per step, {args.steps} steps (median after {args.warmup}); {info['machine']}.",
             "", "| processes | threads each | accumulation | median step s | speed-up vs 1 x 1 | wall s "
             "| load before |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['threads_per_process']} | {r['accumulation']} | {r['median_step_s']:.3f} | "
              f"{r['speedup_vs_1x1']:.2f} | {r['wall_s']:.1f} | {r['load_before']:.1f} |" for r in rows]
    os.makedirs(args.out, exist_ok=True)
    pathlib.Path(args.out, "distributed_cpu.json").write_text(json.dumps(info, indent=1))
    pathlib.Path(args.out, "distributed_cpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
