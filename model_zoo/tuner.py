"""Grid search over a FuxiCTR tuner file, one `run_expid.py` process per combination.

A tuner file (FuxiCTR's format) is a YAML mapping with the keys

    base_config: ./config/          # config folder holding the base expid (default ./config/)
    base_expid: SparCode_demo_001   # the expid every combination starts from
    dataset_id: demo                # optional; default: the base expid's dataset_id
    tuner_space:                    # key -> grid values; a scalar (or one value) is a fixed override
      num_codebooks: [1, 2]
      hidden_units: [[256, 256], [128]]   # a list-valued key takes a list of lists
      epochs: 2
    model_config: {...}             # optional: inline model entries instead of base_config
    dataset_config: {...}           # optional: inline dataset entries instead of base_config

`prepare()` validates the file (an unknown tuned key is a ConfigError naming it, before any
run), writes `<output>/<stem>/dataset_config.yaml` and `model_config.yaml` with one expid per
combination, named `<base_expid>_tuner_<hash>` where the hash covers every setting that can
change the result (so reruns map to the same names, and a changed base config to new ones).

Unlike FuxiCTR's `enumerate_params`, which renames the dataset id per combination (so every
combination rebuilds its H5 files), the combinations share the dataset of `dataset_id`;
only a tuned key that changes the built data (e.g. `max_len`) gets derived dataset ids
`<dataset_id>_<hash>`, one per distinct value. `build_data()` builds each dataset once,
in the tuner process, before any worker starts; workers then find it up to date.

`run_plan()` runs the combinations `workers` at a time on CPU (or once per listed GPU);
a combination whose result JSON exists is skipped (resumable); a failed run is recorded
with its error and the others go on. Reports: see `model_zoo.results`. A launcher starts each
run: `LocalLauncher` (child processes of the tuner) or `tuner_ray.RayLauncher` (Ray tasks); the
plan, the resume and the reports are the same for both.
"""
import difflib
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

import yaml

from . import get_model
from .config import (DATASET_DEFAULTS, DEFAULTS, KEYS, check_dataset_keys, check_model_keys, load_dataset_config,
                     load_experiment, load_model_config, model_parameters)
from .data.pipeline import BUILD_KEYS, build_dataset, data_dir_of
from .errors import ConfigError
from .results import (DEFAULT_CONTRIBUTOR, find_index_average_items, find_index_metrics, find_index_sparsity,
                      is_current, write_reports)

TUNER_FILE_KEYS = ("base_config", "base_expid", "dataset_id", "tuner_space", "model_config", "dataset_config")
# Keys that cannot be tuned, with the reason given in the error.
UNTUNABLE = {
    "model": "write one tuner file per model",
    "model_id": "expids are generated per combination",
    "dataset_id": "write one tuner file per dataset (or set the tuner file's dataset_id)",
    "gpu": "devices are chosen with --gpu",
    "data_root": "every run shares the built data",
    "raw_dir": "every run shares the built data",
    "model_root": "every run writes to the same model_root",
}
PATH_KEYS = ("data_root", "raw_dir", "model_root")
# Keys that do not change a result: left out of the expid hash.
HASH_IGNORED = ("data_root", "raw_dir", "model_root", "verbose", "gpu", "model_id")
STATUS_DIR, LOG_DIR = "runs", "logs"


@dataclass
class Combination:
    """One grid point: its expid, tuned values and the dataset id its run uses."""
    index: int
    expid: str
    tuned: dict
    data_id: str
    entry: dict
    params: dict = field(default_factory=dict)     # merged, checked config (load_experiment(...).params)


@dataclass
class TunerPlan:
    """Everything a tuner run needs, from `prepare()`."""
    tuner_file: str
    stem: str
    output_dir: str
    config_dir: str
    base_expid: str
    dataset_id: str
    model: str
    tuned_keys: list                                 # tuner_space keys with several values
    fixed: dict                                      # tuner_space keys with one value: applied to every run
    combinations: list
    datasets: dict                                   # data_id -> dataset entry

    def result_path(self, combo):
        return os.path.join(combo.params["model_root"], combo.data_id, combo.expid + ".json")

    def run_log_path(self, combo):
        return os.path.join(combo.params["model_root"], combo.data_id, combo.expid + ".log")

    def status_path(self, combo):
        return os.path.join(self.output_dir, STATUS_DIR, combo.expid + ".json")

    def worker_log_path(self, combo):
        return os.path.join(self.output_dir, LOG_DIR, combo.expid + ".log")

    @property
    def lines_path(self):
        """FuxiCTR result lines: run_expid appends to `<config folder name>.csv` in its CWD."""
        return os.path.join(self.output_dir, self.stem + ".csv")


# ---- reading and validating the tuner file ---------------------------------------------------------
def _read_yaml_mapping(path, what):
    if not os.path.isfile(path):
        raise ConfigError(f"{what} {path} does not exist")
    try:
        with open(path, encoding="utf-8") as fd:
            content = yaml.safe_load(fd)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: malformed YAML: {exc}") from None
    if not isinstance(content, dict):
        raise ConfigError(f"{path}: expected a mapping with keys {list(TUNER_FILE_KEYS)}, "
                          f"got {type(content).__name__}")
    return content


def _absolute(path):
    return os.path.abspath(os.path.expanduser(str(path)))


def tunable_keys(model_cls):
    """Dataset, training and serving keys plus the constructor keywords of `model_cls` and its MatchModel bases."""
    return set(KEYS) | set(model_parameters(model_cls))


def _grid_values(tuner_file, key, value, base_value):
    values = value if isinstance(value, list) else [value]
    if not values:
        raise ConfigError(f"{tuner_file}: tuner_space.{key} is an empty list; give at least one value")
    if isinstance(base_value, (list, tuple)):
        scalars = [v for v in values if v is not None and not isinstance(v, (list, tuple))]
        if scalars:
            raise ConfigError(f"{tuner_file}: tuner_space.{key}={value!r}: {key} takes a list "
                              f"(base value {list(base_value)}); give its grid values as a list of lists, "
                              f"e.g. {key}: [{json.dumps(list(base_value))}]")
    seen = set()
    for v in values:
        text = json.dumps(v, sort_keys=True, default=str)
        if text in seen:
            raise ConfigError(f"{tuner_file}: tuner_space.{key} lists the value {v!r} twice")
        seen.add(text)
    return values


def _short_hash(content):
    text = json.dumps(content, sort_keys=True, default=str)
    return hashlib.md5(text.encode("utf-8")).hexdigest()[:8]


def _build_params(dataset_entry):
    merged = dict(DATASET_DEFAULTS)
    merged.update(dataset_entry)
    return json.loads(json.dumps({k: merged.get(k) for k in BUILD_KEYS}, default=list))


def _load_base(tuner, tuner_file):
    """(model entry, dataset entry, dataset_id) of the base expid, paths made absolute."""
    base_expid = tuner["base_expid"]
    base_config = tuner.get("base_config", "./config/")
    if "model_config" in tuner:
        inline = tuner["model_config"]
        if not isinstance(inline, dict) or base_expid not in inline:
            raise ConfigError(f"{tuner_file}: model_config has no entry base_expid={base_expid}")
        entry = dict(inline.get("Base") or {})
        entry.update(inline[base_expid] or {})
    else:
        entry = load_model_config(base_config, base_expid)
    entry = {k: v for k, v in entry.items() if not k.startswith("_") and k != "model_id"}
    for key in ("model", "dataset_id"):
        if key not in entry:
            raise ConfigError(f"{tuner_file}: base expid {base_expid} has no {key}")
    dataset_id = str(tuner.get("dataset_id") or entry["dataset_id"])
    entry["dataset_id"] = dataset_id
    if "dataset_config" in tuner:
        inline = tuner["dataset_config"]
        if not isinstance(inline, dict) or dataset_id not in inline:
            raise ConfigError(f"{tuner_file}: dataset_config has no entry dataset_id={dataset_id}")
        dataset = dict(inline[dataset_id] or {})
        check_dataset_keys(dataset, f"{tuner_file}: dataset_config.{dataset_id}")
    else:
        dataset = load_dataset_config(base_config, dataset_id)
    dataset = {k: v for k, v in dataset.items() if not k.startswith("_") and k != "dataset_id"}
    # Paths are relative to the directory the tuner is started from; workers run elsewhere.
    dataset["data_root"] = _absolute(dataset.get("data_root", DATASET_DEFAULTS["data_root"]))
    if dataset.get("raw_dir"):
        dataset["raw_dir"] = _absolute(dataset["raw_dir"])
    for key in ("data_root", "raw_dir"):
        if entry.get(key):                        # a dataset key set in the model entry wins there
            entry[key] = _absolute(entry[key])
    entry["model_root"] = _absolute(entry.get("model_root", DEFAULTS["model_root"]))
    return entry, dataset, dataset_id


def prepare(tuner_file, output_dir=None):
    """Validate a tuner file and write the generated config folder. Returns a TunerPlan.

    Raises ConfigError (naming the key) for an unknown or untunable tuned key, a malformed
    grid, or a generated expid that `load_experiment` / `check_model_keys` rejects, before anything runs.
    """
    tuner = _read_yaml_mapping(tuner_file, "tuner file")
    unknown = sorted(set(tuner) - set(TUNER_FILE_KEYS))
    if unknown:
        raise ConfigError(f"{tuner_file}: unknown top-level key(s) {unknown}; known keys: {list(TUNER_FILE_KEYS)}")
    if not tuner.get("base_expid"):
        raise ConfigError(f"{tuner_file}: base_expid is missing")
    space = tuner.get("tuner_space") or {}
    if not isinstance(space, dict):
        raise ConfigError(f"{tuner_file}: tuner_space must be a mapping of key -> grid values, "
                          f"got {type(space).__name__}")
    entry, dataset, dataset_id = _load_base(tuner, tuner_file)
    base_expid = str(tuner["base_expid"])
    model_cls = get_model(entry["model"])

    # Key checks, before anything is written or run.
    for key in space:
        if key in UNTUNABLE:
            raise ConfigError(f"{tuner_file}: tuner_space key {key!r} cannot be tuned: {UNTUNABLE[key]}")
    known = tunable_keys(model_cls)
    bad = sorted(k for k in space if k not in known)
    if bad:
        hints = {k: difflib.get_close_matches(k, sorted(known), n=1) for k in bad}
        hint = "; ".join(f"did you mean {v[0]!r} for {k!r}?" for k, v in hints.items() if v)
        raise ConfigError(f"{tuner_file}: unknown key(s) in tuner_space: {bad}"
                          f"{' (' + hint + ')' if hint else ''}; {entry['model']} hyperparameters are "
                          f"{sorted(model_parameters(model_cls))} plus the dataset, training and serving keys of "
                          f"model_zoo/config.py")
    bad_base = sorted(k for k in entry if k not in known | {"model", "dataset_id"})
    if bad_base:
        raise ConfigError(f"base expid {base_expid} has unknown key(s) {bad_base} for model {entry['model']}")

    defaults = dict(DEFAULTS)
    defaults.update(model_parameters(model_cls))
    defaults.update(dataset)
    defaults.update(entry)
    grids = {k: _grid_values(tuner_file, k, v, defaults.get(k)) for k, v in space.items()}

    stem = os.path.splitext(os.path.basename(tuner_file))[0]
    output_dir = _absolute(output_dir or os.path.join("tuner_output", stem))
    config_dir = os.path.join(output_dir, stem)

    build_keys = [k for k in grids if k in BUILD_KEYS]
    varied = [k for k, values in grids.items() if len(values) > 1]     # the rest are fixed overrides
    datasets, combos, names = {}, [], set()
    for index, values in enumerate(itertools.product(*grids.values())):
        setting = dict(zip(grids, values))
        tuned = {k: setting[k] for k in varied}
        data_entry = dict(dataset)
        data_entry.update({k: setting[k] for k in build_keys})
        data_id = dataset_id
        if _build_params(data_entry) != _build_params(dataset):   # other data: its own id, built once
            data_id = f"{dataset_id}_{_short_hash(_build_params(data_entry))}"
            data_entry.setdefault("raw_dir", os.path.join(dataset["data_root"], dataset_id, "raw"))
        else:
            data_entry = dict(dataset)
        datasets[data_id] = data_entry
        model_entry = {"model": entry["model"], "dataset_id": data_id}
        model_entry.update({k: v for k, v in entry.items() if k not in build_keys and k not in model_entry})
        model_entry.update({k: v for k, v in setting.items() if k not in build_keys})
        digest = _short_hash({"model": {k: v for k, v in model_entry.items() if k not in HASH_IGNORED},
                              "data": _build_params(data_entry), "dataset_id": dataset_id})
        expid = f"{base_expid}_tuner_{digest}"
        if expid in names:
            raise ConfigError(f"{tuner_file}: two combinations give the same settings ({setting})")
        names.add(expid)
        combos.append(Combination(index=index, expid=expid, tuned=tuned, data_id=data_id, entry=model_entry))

    os.makedirs(config_dir, exist_ok=True)
    _write_yaml(os.path.join(config_dir, "dataset_config.yaml"), datasets,
                f"# Generated by run_param_tuner.py from {tuner_file}; do not edit.\n")
    _write_yaml(os.path.join(config_dir, "model_config.yaml"), {c.expid: c.entry for c in combos},
                f"# Generated by run_param_tuner.py from {tuner_file}: {len(combos)} combination(s) of "
                f"{base_expid}; do not edit.\n")
    for combo in combos:            # every key of every combination is checked before any run
        experiment = load_experiment(config_dir, combo.expid)
        check_model_keys(experiment, model_cls)
        combo.params = experiment.params
    _check_shared_builds(combos)
    return TunerPlan(tuner_file=tuner_file, stem=stem, output_dir=output_dir, config_dir=config_dir,
                     base_expid=base_expid, dataset_id=dataset_id, model=entry["model"],
                     tuned_keys=varied, fixed={k: v[0] for k, v in grids.items() if k not in varied},
                     combinations=combos, datasets=datasets)


class _PlainDumper(yaml.SafeDumper):
    """Writes shared values in full instead of YAML anchors (&id001 / *id001)."""

    def ignore_aliases(self, data):
        return True


def _write_yaml(path, content, header):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fd:
        fd.write(header)
        yaml.dump(content, fd, Dumper=_PlainDumper, sort_keys=False, default_flow_style=None, width=120)
    os.replace(tmp, path)


def _check_shared_builds(combos):
    """Every combination using one dataset id must build it identically (else workers would rebuild)."""
    seen = {}
    for combo in combos:
        params = json.dumps(_build_params(combo.params), sort_keys=True)
        first = seen.setdefault(combo.data_id, (params, combo.expid))
        if first[0] != params:
            raise ConfigError(f"expids {first[1]} and {combo.expid} use dataset {combo.data_id} with different "
                              f"build settings; tune data keys through tuner_space only")


def build_data(plan, log=print):
    """Build (or reuse) each dataset of the plan once, before the workers start."""
    firsts = {}
    for combo in plan.combinations:
        firsts.setdefault(combo.data_id, combo)
    for data_id, combo in firsts.items():
        started = time.time()
        build_dataset(combo.params)
        log(f"[tuner] data {data_id} ready in {data_dir_of(combo.params)} ({time.time() - started:.1f} s)")


# ---- running -------------------------------------------------------------------------------------
def _read_json(path):
    try:
        with open(path, encoding="utf-8") as fd:
            return json.load(fd)
    except (OSError, ValueError):
        return None


def _write_json_atomic(path, content):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fd:
        json.dump(content, fd, indent=2, default=str)
    os.replace(tmp, path)


def load_result(plan, combo):
    """The run's result JSON (written atomically by run_expid), or None if it has not finished.

    A result at the run's path that was written with other parameters (an earlier tuner file with the
    same expid), or before the dataset was last rebuilt (e.g. new raw data), is not this run's: None.
    """
    path = plan.result_path(combo)
    result = _read_json(path)
    return result if is_current(result, path, combo.params, data_dir_of(combo.params)) else None


def _tail(path, lines=20):
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8", errors="replace") as fd:
        content = [line.rstrip("\n").split("\r")[-1] for line in fd]
    return [line for line in content if line.strip()][-lines:]


def format_duration(seconds):
    if seconds is None:
        return "?"
    seconds = int(round(max(0.0, seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def estimate_remaining(durations, running_elapsed, left, slots):
    """Seconds until the grid finishes: mean duration so far spread over the slots; None if unknown."""
    if not durations:
        return None
    mean = sum(durations) / len(durations)
    work = sum(max(0.0, mean - e) for e in running_elapsed) + left * mean
    return work / max(1, slots)


def _die_with_parent_hook():
    """A pre-exec hook making a worker get SIGTERM when the tuner dies (Linux PR_SET_PDEATHSIG), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes
        prctl = ctypes.CDLL(None, use_errno=True).prctl     # loaded here, in the parent, not after fork
    except (OSError, AttributeError):
        return None
    return lambda: prctl(1, signal.SIGTERM)


def _stop(process, grace_seconds=10.0):
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return
    try:
        process.wait(timeout=grace_seconds)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


def _lock_output(output_dir):
    """An exclusive lock on the output folder (released when the tuner exits, even killed)."""
    os.makedirs(output_dir, exist_ok=True)
    handle = open(os.path.join(output_dir, ".tuner.lock"), "a+")
    try:
        import fcntl
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except ImportError:          # not POSIX: no lock
        pass
    except OSError:
        handle.close()
        raise ConfigError(f"another tuner is running in {output_dir}; wait for it or use --output") from None
    return handle


class LocalLauncher:
    """Starts every run as a child process of the tuner, in its own session (stopped with its process group;
    on Linux it gets SIGTERM when the tuner dies)."""

    def __init__(self):
        self.preexec = _die_with_parent_hook()

    def slots(self, gpus, workers):
        """The device of each run slot: `workers` per listed GPU, or `workers` CPU slots (-1)."""
        return [g for g in gpus for _ in range(int(workers))]

    def describe(self, device):
        return "cpu" if device < 0 else f"gpu {device}"

    def start(self, argv, cwd, log_path, env):
        """A running run: an object with poll(), returncode (and pid) as subprocess.Popen."""
        with open(log_path, "w") as out:
            return subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=self.preexec)

    def stop(self, process):
        _stop(process)

    def close(self):
        pass


class _Interrupted(Exception):
    pass


def run_plan(plan, gpus=(-1,), workers=1, tag=None, script=None, log=print, poll_seconds=0.3,
             heartbeat_seconds=60.0, reproduce=None, contributor=DEFAULT_CONTRIBUTOR, command=None, launcher=None):
    """Run the plan's combinations (those whose expid contains `tag`), skipping finished ones.

    Args:
        plan: TunerPlan from prepare().
        gpus: device ids; (-1,) = CPU.
        workers: runs at a time on CPU; with GPUs, runs at a time per GPU.
        tag: only expids containing this string.
        script: the run_expid.py to call (default: the one of this repository).
        log: where progress lines go.
        reproduce: fn(expid) -> command reproducing that run (for the leaderboard).
        command: the tuner command line, quoted in the README.
        launcher: what starts a run (LocalLauncher by default; tuner_ray.RayLauncher for Ray tasks).
    Returns:
        the summary dict (also written to `<output>/summary.json`), with `counts`.
    Raises:
        KeyboardInterrupt on Ctrl-C / SIGTERM, after stopping the running workers and writing reports.
    """
    gpus = [int(g) for g in gpus]
    if not gpus or (-1 in gpus and len(gpus) > 1):
        raise ConfigError(f"--gpu {gpus}: give -1 (CPU) or a list of GPU ids")
    if int(workers) < 1:
        raise ConfigError(f"--workers {workers}: expected >= 1")
    script = _absolute(script or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                              "run_expid.py"))
    if not os.path.isfile(script):
        raise ConfigError(f"run script {script} does not exist")
    selected = [c for c in plan.combinations if tag is None or str(tag) in c.expid]
    if not selected:
        raise ConfigError(f"--tag {tag!r} matches none of the {len(plan.combinations)} expid(s), "
                          f"e.g. {plan.combinations[0].expid}")
    launcher = launcher or LocalLauncher()
    slots = launcher.slots(gpus, workers)
    lock = _lock_output(plan.output_dir)
    reused = [c for c in selected if load_result(plan, c) is not None]
    queue = [c for c in selected if load_result(plan, c) is None]
    total = len(selected)
    log(f"[tuner] {plan.tuner_file}: {total} combination(s), {len(reused)} already finished, "
        f"{len(queue)} to run on {'CPU' if gpus == [-1] else 'GPU ' + str(gpus)} with {len(slots)} worker(s); "
        f"output in {plan.output_dir}")
    os.makedirs(os.path.join(plan.output_dir, LOG_DIR), exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if gpus == [-1] and "OMP_NUM_THREADS" not in os.environ:
        # CPU threads shared by the workers that will run at once
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, min(len(slots), len(queue)))))

    state = {"done": len(reused), "failed": 0}
    durations, running, free = [], {}, list(range(len(slots)))
    started_all = last_report = time.time()

    def report():
        now = time.time()
        eta = estimate_remaining(durations, [now - r["started"] for r in running.values()], len(queue), len(slots))
        log(f"[tuner] done {state['done']}/{total} | running {len(running)} | failed {state['failed']} | "
            f"left {len(queue)} | elapsed {format_duration(now - started_all)} | ETA {format_duration(eta)}")

    def finish(slot, item):
        process, combo = item["process"], item["combo"]
        wall = time.time() - item["started"]
        durations.append(wall)
        result = load_result(plan, combo)
        record = {"expid": combo.expid, "device": slots[slot], "command": item["command"],
                  "returncode": process.returncode, "wall_seconds": round(wall, 2),
                  "started_at": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(item["started"])),
                  "worker_log": plan.worker_log_path(combo)}
        if process.returncode == 0 and result is not None:
            record["status"] = "done"
            state["done"] += 1
            log(f"[tuner] finished {combo.expid} in {format_duration(wall)}: "
                f"valid {combo.params['monitor']} = {result['valid'].get(combo.params['monitor'])}")
        else:
            tail = _tail(plan.worker_log_path(combo))
            if process.returncode is not None and process.returncode < 0:
                reason = f"killed by signal {-process.returncode}"
            elif process.returncode == 0:
                reason = f"exited 0 without writing {plan.result_path(combo)}"
            else:
                reason = f"exit code {process.returncode}"
            record.update(status="failed", error=(tail[-1] if tail else reason), reason=reason, stderr_tail=tail)
            state["failed"] += 1
            log(f"[tuner] FAILED {combo.expid} ({reason}): {record['error']}  [log: {record['worker_log']}]")
        _write_json_atomic(plan.status_path(combo), record)

    def on_sigterm(signum, frame):
        raise _Interrupted()

    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, on_sigterm) if in_main else None
    interrupted = False
    try:
        report()
        while queue or running:
            while queue and free:
                slot, combo = free.pop(0), queue.pop(0)
                argv = [sys.executable, "-u", script, "--config", plan.stem, "--expid", combo.expid,
                        "--gpu", str(slots[slot])]
                process = launcher.start(argv, plan.output_dir, plan.worker_log_path(combo), env)
                running[slot] = {"process": process, "combo": combo, "started": time.time(),
                                 "command": " ".join(argv)}
                log(f"[tuner] started {combo.expid} on {launcher.describe(slots[slot])}: "
                    f"{json.dumps(combo.tuned)}")
            time.sleep(poll_seconds)
            changed = False
            for slot in [s for s, item in running.items() if item["process"].poll() is not None]:
                finish(slot, running.pop(slot))
                free.append(slot)
                changed = True
            if changed or time.time() - last_report >= heartbeat_seconds:
                report()
                last_report = time.time()
    except (KeyboardInterrupt, _Interrupted):
        interrupted = True
        log(f"[tuner] interrupted: stopping {len(running)} running worker(s); rerun the same command to resume")
        for slot, item in list(running.items()):
            launcher.stop(item["process"])
            if load_result(plan, item["combo"]) is not None:     # it finished just before the stop
                finish(slot, item)
            else:
                _write_json_atomic(plan.status_path(item["combo"]),
                                   {"expid": item["combo"].expid, "status": "interrupted",
                                    "error": "stopped by the tuner (interrupted)", "device": slots[slot]})
        running.clear()
    finally:
        for item in running.values():          # an unexpected error: leave no orphan behind
            launcher.stop(item["process"])
        if in_main:
            signal.signal(signal.SIGTERM, previous)
        lock.close()
    summary = summarize(plan, reproduce=reproduce, command=command)
    write_reports(plan.output_dir, summary, contributor=contributor)
    summary["counts"] = {"total": total, "done": state["done"], "failed": state["failed"],
                         "reused": len(reused), "ran": state["done"] - len(reused) + state["failed"],
                         "left": len(queue)}
    if interrupted:
        raise KeyboardInterrupt()
    return summary


# ---- summary ---------------------------------------------------------------------------------------
def _result_line(lines_path, expid):
    if not os.path.exists(lines_path):
        return None
    found = None
    with open(lines_path, encoding="utf-8", errors="replace") as fd:
        for line in fd:
            if f"[exp_id] {expid}," in line:
                found = line.strip()
    return found


def _display_paths(entry):
    """Paths under the current directory shown relative to it (the README is read elsewhere)."""
    shown = dict(entry)
    for key in PATH_KEYS:
        value = shown.get(key)
        if isinstance(value, str) and os.path.isabs(value):
            relative = os.path.relpath(value)
            shown[key] = value if relative.startswith("..") else "./" + relative
    return shown


def summarize(plan, reproduce=None, command=None):
    """Summary of every combination of the plan: status, tuned values, metrics, timings, errors."""
    runs = []
    for combo in plan.combinations:
        result, record = load_result(plan, combo), _read_json(plan.status_path(combo)) or {}
        run = {"expid": combo.expid, "model": plan.model, "dataset_id": plan.dataset_id, "data_id": combo.data_id,
               "tuned": combo.tuned, "monitor": combo.params.get("monitor"),
               "monitor_mode": combo.params.get("monitor_mode"), "valid": {}, "test": {},
               "reproduce": reproduce(combo.expid) if reproduce else None,
               "config": {"dataset_config": {combo.data_id: _display_paths(plan.datasets[combo.data_id])},
                          "model_config": {combo.expid: _display_paths(combo.entry)}},
               "log_path": plan.run_log_path(combo), "result_path": plan.result_path(combo),
               "worker_log": plan.worker_log_path(combo)}
        if result is not None:
            wall = record.get("wall_seconds") if record.get("status") == "done" else None
            if wall is None:
                wall = sum(v for v in (result.get("seconds") or {}).values() if isinstance(v, (int, float)))
            run.update(status="done", valid=result.get("valid") or {}, test=result.get("test") or {},
                       wall_seconds=wall, index_sparsity=find_index_sparsity(result),
                       index_average_items=find_index_average_items(result),
                       index_test=find_index_metrics(result),
                       result_line=_result_line(plan.lines_path, combo.expid))
        else:
            run.update(status=record.get("status") if record.get("status") in ("failed", "interrupted")
                       else "pending", error=record.get("error"), wall_seconds=record.get("wall_seconds"))
        runs.append(run)
    fixed = f", with {json.dumps(plan.fixed)} for every run" if plan.fixed else ""
    notes = (f"Grid search over {plan.tuned_keys or 'no key'} from `{plan.base_expid}`{fixed} "
             f"({len(plan.combinations)} combination(s)), run with:\n\n```bash\n{command}\n```"
             if command else None)
    return {"title": f"{plan.model} on {plan.dataset_id}: {plan.stem}", "tuner_file": plan.tuner_file,
            "command": command, "notes": notes,
            "base_expid": plan.base_expid, "dataset_id": plan.dataset_id, "model": plan.model,
            "tuned_keys": plan.tuned_keys, "config_dir": plan.config_dir, "lines_file": plan.lines_path,
            "runs": runs}
