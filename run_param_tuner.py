"""Grid search over a FuxiCTR tuner file.

    python run_param_tuner.py --config config/tuner/sparcode_demo.yaml [--gpu -1 | --gpu 0 1] [--workers N]

Reads a FuxiCTR tuner file (base_config, base_expid, dataset_id, tuner_space), writes one expid
per combination into `<output>/<tuner file stem>/`, builds the data once, then runs every
combination as its own `run_expid.py` process: `--workers` at a time on CPU, one per listed GPU
(times `--workers`). A rerun skips the combinations that already have a result. Reports in the
output folder (default `tuner_output/<tuner file stem>/`): `<stem>.csv` (FuxiCTR result lines),
`full_results.csv`, `leaderboard_<dataset_id>.csv`, `README.md`, `summary.json`, `logs/`, `runs/`.

Exit code: 0 all selected runs finished, 1 some failed, 2 a config/data error (nothing ran),
130 interrupted (rerun the same command to resume).
"""
import argparse
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
    if args.workers != 1:
        parts += ["--workers", str(args.workers)]
    for flag, value in (("--output", args.output), ("--tag", args.tag), ("--script", args.script)):
        if value:
            parts += [flag, shlex.quote(value)]
    return " ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="tuner file (YAML)")
    parser.add_argument("--gpu", type=int, nargs="+", default=[-1],
                        help="-1 for CPU (default), or GPU ids: one run per GPU at a time")
    parser.add_argument("--workers", type=int, default=1,
                        help="runs at a time on CPU; with GPUs, runs at a time per GPU (default 1)")
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
        summary = run_plan(plan, gpus=args.gpu, workers=args.workers, tag=args.tag, script=args.script,
                           log=lambda msg: print(msg, flush=True),
                           reproduce=reproduce_command(args.config, args.gpu), contributor=args.contributor,
                           command=tuner_command(args))
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
