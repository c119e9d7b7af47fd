"""Training examples per second with 1 and 2 processes (torchrun, gloo on CPU), then the index of the trained
model built in 1 and 2 processes and exported to the in-process engine (Qdrant local mode).

Each setting trains a copy of SparCode_demo_001 for one epoch capped at `--steps` steps per process (no
serving, validation on 200 users) from its own config folder under `--work`, reusing the built demo data:

    processes 1, threads T:  OMP_NUM_THREADS=T python run_expid.py --config <work>/p1t<T>/config --expid X
    processes 2, threads 1:  OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 --master_addr 127.0.0.1 \\
                             --master_port <free> run_expid.py --config <work>/p2t1/config --expid X

Examples per second are the epoch's training rows (over every process) per second of the training loop,
read from the run's result JSON. With 2 processes a step holds 2 x batch_size rows. Then, on the checkpoint of
the first setting: the index by engine/serving.build_code_index and by serving/export.build_index over 2
processes (their stored sha256 with the measured seconds set equal), and the export CLI's Qdrant check.
Output: benchmarks/results/distributed_throughput.{md,csv,json}.

    python benchmarks/distributed_throughput.py                 # about 6 minutes on 2 cores
"""
import argparse
import csv
import datetime
import json
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from model_zoo.config import load_dataset_config, load_model_config  # noqa: E402

EXPID, BASE_EXPID = "SparCode_demo_throughput", "SparCode_demo_001"
SETTINGS = ((1, 1), (1, 2), (2, 1))             # (processes, threads per process)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300, help="training steps per process (default 300)")
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "sparcode_distributed_throughput"),
                        help="config folders and checkpoints of the runs")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "distributed_throughput"))
    parser.add_argument("--check-users", type=int, default=500)
    parser.add_argument("--report-only", action="store_true", help="rewrite the .md from the saved .json")
    return parser.parse_args(argv)


def write_config(folder, steps):
    """<folder>/config with the demo dataset (data under the repository's data/) and EXPID; returns it."""
    dataset = {k: v for k, v in load_dataset_config(os.path.join(ROOT, "config"), "demo").items()
               if not k.startswith("_") and k != "dataset_id"}
    dataset["data_root"] = os.path.join(ROOT, "data")
    entry = {k: v for k, v in load_model_config(os.path.join(ROOT, "config"), BASE_EXPID).items()
             if not k.startswith("_") and k != "model_id"}
    entry.update(epochs=1, max_steps_per_epoch=steps, serve=False, eval_max_users=200,
                 model_root=os.path.join(folder, "checkpoints"))
    config = os.path.join(folder, "config")
    os.makedirs(os.path.join(config, "model_config"), exist_ok=True)
    with open(os.path.join(config, "dataset_config.yaml"), "w") as fd:
        yaml.safe_dump({"demo": dataset}, fd)
    with open(os.path.join(config, "model_config", "bench.yaml"), "w") as fd:
        yaml.safe_dump({EXPID: entry}, fd)
    return config


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def train(processes, threads, config):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), GLOO_SOCKET_IFNAME="lo")
    script = [os.path.join(ROOT, "run_expid.py"), "--config", config, "--expid", EXPID, "--fresh"]
    if processes == 1:
        command = [sys.executable] + script
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
                   "--master_addr", "127.0.0.1", "--master_port", str(free_port())] + script
    load = os.getloadavg()[0]                  # other work on the machine when the run starts
    started = time.time()
    subprocess.run(command, check=True, env=env, cwd=os.path.dirname(config), stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    wall = time.time() - started
    with open(os.path.join(os.path.dirname(config), "checkpoints", "demo", EXPID + ".json")) as fd:
        result = json.load(fd)
    epoch = result["history"][0]
    return {"processes": result["training_processes"], "threads": threads,
            "batch_rows_per_step": processes * result["params"]["batch_size"],
            "examples_per_second": round(epoch["examples_per_second"], 1),
            "train_seconds": round(epoch["train_seconds"], 1), "wall_seconds": round(wall, 1),
            "valid_Recall@50": round(result["valid"]["Recall(k=50)"], 4), "load_before": round(load, 2)}


def index_and_export(config, check_users):
    """Index of the trained checkpoint in 1 and 2 processes, and the export CLI's Qdrant check."""
    from model_zoo.serving.export import ExpidScoreFunction, build_index, load_trained, user_keys
    params, data_dir, model, users = load_trained(config, EXPID)
    k_u = int(user_keys(model, users["test"]).shape[1])
    timings, indexes = {}, {}
    for workers in (1, 2):
        started = time.perf_counter()
        indexes[workers] = build_index(model, data_dir, params, workers, ExpidScoreFunction(config, EXPID),
                                       num_query_tokens=k_u)
        timings[workers] = time.perf_counter() - started
    one, sharded = indexes[1], indexes[2]
    sharded.build_seconds, sharded.extra_metadata = one.build_seconds, dict(one.extra_metadata)
    folder = os.path.dirname(config)
    sums = []
    for name, index in (("one", one), ("sharded", sharded)):
        with np.load(index.write(os.path.join(folder, f"{name}.npz")), allow_pickle=False) as archive:
            sums.append(archive["sha256"].tobytes().decode())
    started = time.time()
    output = subprocess.run([sys.executable, "-m", "model_zoo.serving.export", "--config", config, "--expid", EXPID,
                             "--engine", "qdrant", "--output", os.path.join(folder, "qdrant"), "--rebuild",
                             "--check-users", str(check_users)], check=True, capture_output=True, text=True,
                            cwd=ROOT).stdout
    recall = float(output.split("test users: ")[1].split()[0])
    return {"keys": one.n_keys, "scores": one.nnz, "seconds_1": round(timings[1], 2), "seconds_2": round(timings[2], 2),
            "same_sha256": sums[0] == sums[1], "sha256": sums[0][:16], "qdrant_recall": recall,
            "qdrant_users": check_users, "export_seconds": round(time.time() - started, 1)}


def render(rows, serving, steps, day):
    """The markdown report."""
    base = next(r for r in rows if r["processes"] == 1 and r["threads"] == 1)["examples_per_second"]
    lines = [f"# Training throughput with 1 and 2 processes ({BASE_EXPID}, demo data)", "",
             f"Written by `python benchmarks/distributed_throughput.py --steps {steps}` on {day} (2 CPU cores, no "
             f"GPU). One epoch of {steps} steps per process; batch_size 256 per process. 2 processes: torchrun, gloo "
             f"on the loopback interface. Load average before: the 1-minute load average when the run started; above "
             f"2, the 2 cores were shared with other work and the rates are lower bounds (a process with 2 threads "
             f"loses most when a core is taken).", "",
             "| processes | threads each | rows per step | examples / s | vs 1 process x 1 thread | train s | "
             "load average before |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['processes']} | {r['threads']} | {r['batch_rows_per_step']} | {r['examples_per_second']:.0f} | "
              f"{r['examples_per_second'] / base:.2f} | {r['train_seconds']} | {r['load_before']} |" for r in rows]
    lines += ["", f"Index of the 1-process, 2-thread checkpoint ({serving['keys']} keys, {serving['scores']} scores): "
              f"{serving['seconds_1']} s in one process, {serving['seconds_2']} s over 2 worker processes "
              f"(spawn and model loading included); same stored sha256: {serving['same_sha256']} "
              f"({serving['sha256']}...).",
              f"Qdrant local mode (`python -m model_zoo.serving.export --config <work>/p1t2/config --expid {EXPID} "
              f"--engine qdrant --rebuild --check-users {serving['qdrant_users']}`): recall of the index's top 50 on "
              f"{serving['qdrant_users']} test users {serving['qdrant_recall']:.4f} "
              f"({serving['export_seconds']} s for the command).", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    if args.report_only:                      # the table again from the saved measurements
        with open(args.out + ".json") as fd:
            saved = json.load(fd)
    else:
        rows = []
        for processes, threads in SETTINGS:
            folder = os.path.join(args.work, f"p{processes}t{threads}")
            rows.append(train(processes, threads, write_config(folder, args.steps)))
            print(json.dumps(rows[-1]), flush=True)
        serving = index_and_export(os.path.join(args.work, "p1t2", "config"), args.check_users)
        print(json.dumps(serving), flush=True)
        saved = {"rows": rows, "serving": serving, "steps": args.steps, "day": str(datetime.date.today())}
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out + ".json", "w") as fd:
            json.dump(saved, fd, indent=2)
        with open(args.out + ".csv", "w", newline="") as fd:
            writer = csv.DictWriter(fd, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    with open(args.out + ".md", "w") as fd:
        fd.write(render(saved["rows"], saved["serving"], saved["steps"], saved["day"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
