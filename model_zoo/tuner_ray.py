"""Tuner runs as Ray tasks: `python run_param_tuner.py --config T.yaml --ray-address auto|local|<address>`.

Each combination runs as one Ray task with `num_cpus` CPUs and `num_gpus` (possibly fractional) GPUs; Ray
places the tasks on the nodes that have those resources free. A task starts the same `run_expid.py` command
as the local tuner, in the tuner's output folder, writing the same per-run log. The tuner process keeps
everything else: the generated config, the skip of finished combinations (resume), the status files and the
reports, which are therefore the same files with or without Ray (tests/test_tuner_ray.py).

- `local`: a Ray started by the tuner on this machine for its lifetime, on the loopback interface.
- `auto` (a cluster started with `ray start`) or an address: every node must see the output folder, the data
  and the checkpoints at the same paths (a shared file system) and have this project installed for the same
  Python executable.

A task's GPU is the one Ray assigns (it sets CUDA_VISIBLE_DEVICES), so the run gets `--gpu 0`, or `--gpu -1`
without GPUs; OMP_NUM_THREADS is the task's CPUs unless it is set in the tuner's environment. Ray is an
optional extra (`pip install -e ".[ray]"`).
"""
import math
import os
import signal

# Where Ray stops the runs it was asked to stop: the run's return code is that of SIGTERM.
STOPPED = -signal.SIGTERM


def _trial_function():
    """The Ray task body. Defined inside a function so that Ray ships it by value: a Ray worker runs it
    without importing this project (only the run itself does)."""
    def run_trial(argv, cwd, log_path, env):
        import ctypes
        import subprocess
        import sys

        def die_with_parent():                     # as tuner._die_with_parent_hook: SIGTERM when the task dies
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
        preexec = die_with_parent if sys.platform.startswith("linux") else None
        with open(log_path, "w") as out:
            return subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                    start_new_session=True, preexec_fn=preexec).wait()
    return run_trial


class RayTrial:
    """A run submitted as a Ray task, with the poll() / returncode of subprocess.Popen."""

    def __init__(self, ref, log_path):
        self.ref, self.log_path, self.returncode = ref, log_path, None

    def poll(self):
        import ray
        if self.returncode is None and ray.wait([self.ref], timeout=0)[0]:
            try:
                self.returncode = int(ray.get(self.ref))
            except ray.exceptions.TaskCancelledError:
                self.returncode = STOPPED
            except ray.exceptions.RayError as exc:              # the task or its worker failed
                with open(self.log_path, "a") as out:
                    out.write(f"\nERROR: the Ray task failed: {type(exc).__name__}: {exc}\n")
                self.returncode = 1
        return self.returncode

    def stop(self, grace_seconds=10.0):
        import ray
        if self.poll() is not None:
            return
        ray.cancel(self.ref, force=True)
        ray.wait([self.ref], timeout=grace_seconds)
        if self.poll() is None:
            self.returncode = STOPPED


class RayLauncher:
    """tuner.run_plan's launcher for Ray tasks (the interface of tuner.LocalLauncher).

    Args:
        address: "local" (start a Ray on this machine), "auto" (the running cluster) or a Ray address.
        num_cpus: CPUs of each run (> 0).
        num_gpus: GPUs of each run (>= 0, fractional allowed).
        in_flight: runs submitted at a time (None: as many as the cluster's CPUs and GPUs fit).
    """

    def __init__(self, address="auto", num_cpus=1.0, num_gpus=0.0, in_flight=None):
        if isinstance(num_cpus, bool) or not isinstance(num_cpus, (int, float)) or not num_cpus > 0:
            raise ValueError(f"--ray-cpus {num_cpus!r}: expected a number > 0")
        if isinstance(num_gpus, bool) or not isinstance(num_gpus, (int, float)) or not num_gpus >= 0:
            raise ValueError(f"--ray-gpus {num_gpus!r}: expected a number >= 0")
        if in_flight is not None and (isinstance(in_flight, bool) or not isinstance(in_flight, int) or in_flight < 1):
            raise ValueError(f"--workers {in_flight!r}: expected an int >= 1")
        self.address, self.in_flight = address, in_flight
        self.num_cpus, self.num_gpus = float(num_cpus), float(num_gpus)
        self._task = None

    def _connect(self):
        """Start or join Ray when it is first needed (a rerun with nothing left to run starts none)."""
        import ray
        if self._task is None:
            if self.address == "local":     # one machine: Ray's processes talk over the loopback interface only
                os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
            try:
                ray.init(address=self.address, include_dashboard=False, log_to_driver=False, configure_logging=False)
            except ConnectionError as exc:
                raise ValueError(f"--ray-address {self.address}: {exc}") from None
            self._task = ray.remote(_trial_function()).options(num_cpus=self.num_cpus, num_gpus=self.num_gpus,
                                                               max_retries=0)
        return ray

    def capacity(self):
        """Runs the cluster's resources hold at once (at least 1)."""
        resources = self._connect().cluster_resources()
        fits = [math.floor(resources.get("CPU", 0.0) / self.num_cpus + 1e-9)]
        if self.num_gpus > 0:
            fits.append(math.floor(resources.get("GPU", 0.0) / self.num_gpus + 1e-9))
        return max(1, min(fits))

    def slots(self, gpus, workers):
        """`in_flight` (or capacity()) slots; a run's device is GPU 0 of its task, or -1 (CPU)."""
        return [0 if self.num_gpus > 0 else -1] * (self.in_flight or self.capacity())

    def describe(self, device):
        return f"ray ({self.num_cpus:g} CPU, {self.num_gpus:g} GPU)"

    def start(self, argv, cwd, log_path, env):
        self._connect()
        env = dict(env)
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, int(self.num_cpus)))
        return RayTrial(self._task.remote(argv, cwd, log_path, env), log_path)

    def stop(self, trial):
        trial.stop()

    def close(self):
        if self._task is not None:
            import ray
            ray.shutdown()
            self._task = None
