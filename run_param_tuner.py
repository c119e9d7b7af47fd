"""Grid search over a FuxiCTR tuner file.

    python run_param_tuner.py --config config/tuner/sparcode_demo.yaml [--gpu -1 | --gpu 0 1] [--workers N]
    python run_param_tuner.py --config config/tuner/sparcode.yaml --ray-address auto --ray-cpus 4 --ray-gpus 0.5

Reads a FuxiCTR tuner file (base_config, base_expid, dataset_id, tuner_space), writes one expid
per combination into `<output>/<tuner file stem>/`, builds the data once, then runs every
combination as its own `run_expid.py` process: `--workers` at a time on CPU, one per listed GPU
(times `--workers`), or as Ray tasks with `--ray-address` (model_zoo/tuner_ray.py; without Ray
installed the tuner says so and runs local processes). A rerun skips the combinations that already
have a result. Reports in the output folder (default `tuner_output/<tuner file stem>/`): `<stem>.csv`
(FuxiCTR result lines), `full_results.csv`, `leaderboard_<dataset_id>.csv`, `README.md`, `summary.json`,
`logs/`, `runs/`; the same files with or without Ray.

Exit code: 0 all selected runs finished, 1 some failed, 2 a config/data error (nothing ran),
130 interrupted (rerun the same command to resume).
"""
import argparse
import importlib.util
import os
import shlex
import sys

from model_zoo.errors import ConfigError, DataError
from model_zoo.results import DEFAULT_CONTRIBUTOR


def reproduce_command(tuner_file, gpus):
    """fn(expid) -> the command that reruns that one combination from a fresh checkout."""
    path = os.path.abspath(tuner_file)
    relative = os.path.relpath(path)
    shown = relative if not relative.startswith("..") else path
    gpu = " ".join(str(g) for g in gpus) if gpus != [-1] else "-1"
    return lambda expid: (f"python run_param_tuner.py --config {shlex.quote(shown)} --tag {expid} "
                          f"--gpu {gpu}")


def tuner_command(args):
    """The command line of this tuner run (for the README), with the tuner file as given."""
    parts = ["python run_param_tuner.py", "--config", shlex.quote(args.config), "--gpu",
             " ".join(str(g) for g in args.gpu)]
    if args.workers not in (None, 1):
        parts += ["--workers", str(args.workers)]
    if args.ray_address:
        parts += ["--ray-address", shlex.quote(args.ray_address), "--ray-cpus", f"{args.ray_cpus:g}",
                  "--ray-gpus", f"{args.ray_gpus:g}"]
    for flag, value in (("--output", args.output), ("--tag", args.tag), ("--script", args.script)):
        if value:
            parts += [flag, shlex.quote(value)]
    return " ".join(parts)


def make_launcher(args):
    """Ray tasks with --ray-address (when Ray is installed), else local processes."""
    from model_zoo.tuner import LocalLauncher
    if not args.ray_address:
        return LocalLauncher()
    if importlib.util.find_spec("ray") is None:
        print("[tuner] --ray-address is set but Ray is not installed (pip install -e \".[ray]\"): the runs are "
              "local processes", file=sys.stderr, flush=True)
        return LocalLauncher()
    from model_zoo.tuner_ray import RayLauncher
    launcher = RayLauncher(args.ray_address, args.ray_cpus, args.ray_gpus, in_flight=args.workers)
    print(f"[tuner] Ray at {args.ray_address}: each run is a task with {args.ray_cpus:g} CPU(s) and "
          f"{args.ray_gpus:g} GPU(s)", flush=True)
    return launcher


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="tuner file (YAML)")
    parser.add_argument("--gpu", type=int, nargs="+", default=[-1],
                        help="-1 for CPU (default), or GPU ids: one run per GPU at a time")
    parser.add_argument("--workers", type=int, default=None,
                        help="runs at a time on CPU; with GPUs, runs at a time per GPU (default 1); with Ray, "
                             "runs submitted at a time (default: as many as the cluster's resources hold)")
    parser.add_argument("--ray-address", default=None,
                        help="run each combination as a Ray task: 'local' (a Ray on this machine), 'auto' (the "
                             "cluster of `ray start`) or a Ray address; needs `pip install -e \".[ray]\"`")
    parser.add_argument("--ray-cpus", type=float, default=1.0, help="CPUs of each Ray task (default 1)")
    parser.add_argument("--ray-gpus", type=float, default=0.0, help="GPUs of each Ray task, may be fractional "
                                                                      "(default 0)")
    parser.add_argument("--output", default=None, help="output folder (default tuner_output/<tuner file stem>)")
    parser.add_argument("--tag", default=None, help="only run expids containing this string")
    parser.add_argument("--script", default=None, help="run script (default: run_expid.py next to this file)")
    parser.add_argument("--contributor", default=DEFAULT_CONTRIBUTOR, help="Contributor column of the leaderboard")
    parser.add_argument("--dry-run", action="store_true", help="write the generated config and list the runs")
    args = parser.parse_args(argv)

    from model_zoo.tuner import build_data, prepare, run_plan
    try:
        plan = prepare(args.config, args.output)
        print(f"[tuner] {len(plan.combinations)} combination(s) of {plan.base_expid} over "
              f"{plan.tuned_keys or 'no key'}; generated config in {plan.config_dir}", flush=True)
        if args.dry_run:
            for combo in plan.combinations:
                print(f"{combo.expid} {combo.tuned}")
            return 0
        build_data(plan, log=lambda msg: print(msg, flush=True))
        launcher = make_launcher(args)
        try:
            summary = run_plan(plan, gpus=args.gpu, workers=args.workers or 1, tag=args.tag, script=args.script,
                               log=lambda msg: print(msg, flush=True),
                               reproduce=reproduce_command(args.config, args.gpu), contributor=args.contributor,
                               command=tuner_command(args), launcher=launcher)
        finally:
            launcher.close()
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("[tuner] interrupted; reports written for the finished runs", file=sys.stderr)
        return 130
    counts = summary["counts"]
    print(f"[tuner] {counts['done']}/{counts['total']} done ({counts['reused']} reused), {counts['failed']} "
          f"failed; reports in {plan.output_dir}", flush=True)
    return 1 if counts["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
