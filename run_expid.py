"""Train, evaluate and serve one experiment: `python run_expid.py --expid DSSM_demo_001`.

FuxiCTR conventions: `--config` (a folder with dataset_config.yaml and model_config/),
`--expid`, `--gpu` (-1 = CPU). A rerun of an expid whose run was killed continues from its last
completed epoch; `--fresh` starts over. Errors in the config or the data are printed as one line
naming the file and key, and the exit code is 2.
"""
import argparse
import sys

from model_zoo.errors import ConfigError, DataError
from model_zoo.engine.experiment import run_experiment


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="./config/", help="config folder")
    parser.add_argument("--expid", required=True, help="experiment id in config/model_config/*.yaml")
    parser.add_argument("--gpu", type=int, default=-1, help="GPU index, -1 for CPU")
    parser.add_argument("--fresh", action="store_true",
                        help="train from the first epoch even if a killed run of this expid left a training state")
    args = parser.parse_args(argv)
    try:
        run_experiment(args.config, args.expid, gpu=args.gpu, command="python " + " ".join(sys.argv), fresh=args.fresh)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
