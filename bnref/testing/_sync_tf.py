"""Real multi-replica runs of ``bnref.tf.BatchNorm(synchronized=True)`` for the synchronized
property, on TensorFlow's own distributed engine.

:func:`run_tf_sync` runs cases under ``tf.distribute.MirroredStrategy`` in one subprocess of
``k`` logical CPU devices (TensorFlow fixes its logical devices when its runtime first
initializes, so they are configured in a fresh process): a case of ``n`` workers runs on a
strategy over the first ``n`` devices. Strategies over different devices in one process need
their own collective group keys ("joining a group with size 3, but that group has size 2"
otherwise), which TensorFlow's own tests give them the same way (``_collective_key_base``,
tensorflow/python/distribute/strategy_combinations.py). With ``engine="multiworker"`` it is
``tf.distribute.MultiWorkerMirroredStrategy`` instead: ``k`` processes of one replica each, a
cluster on loopback (``TF_CONFIG``, free ports picked here), collectives over gRPC between
processes; every case then has ``k`` workers.

For each case: the layer built from the case under the strategy's scope, then one training
step inside ``strategy.run`` (a ``tf.function``, or eagerly), replica ``j`` on shard ``j``
(shards may be uneven, and empty): ``y``, the gradient of ``sum(y * dy_j)`` (``dx``,
``dgamma``, ``dbeta``) and replica ``j``'s own copy of the moving statistics, as a
:class:`~bnref.testing.sync.Synced` with one entry per replica.

:func:`run_tf_sync_jobs` is the general form: :class:`Job`\\s that also run Keras's own
``keras.layers.BatchNormalization(synchronized=True)``, the unsynchronized layer, or inference.

Every process is bounded by ``timeout`` (all are killed when one outlives it). An exception
inside a job comes back as a :class:`TfSyncError` with the job and the worker's traceback.

Run as ``python -m bnref.testing._sync_tf SPEC``: a worker (``SPEC`` a pickled dict).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from bnref.testing.sync import SyncCase, Synced

__all__ = ["ENGINES", "LAYERS", "Job", "TfSyncError", "run_tf_sync", "run_tf_sync_jobs"]

LAYERS = ("bnref", "unsynchronized", "keras")
ENGINES = ("mirrored", "multiworker")


class TfSyncError(RuntimeError):
    """A job that raised inside a TensorFlow worker, or a worker that failed."""


@dataclasses.dataclass(frozen=True)
class Job:
    """One run in the workers: ``case`` on ``case.k`` replicas.

    ``layer``: ``"bnref"`` (``bnref.tf.BatchNorm(synchronized=True)``), ``"unsynchronized"``
    (the same layer with ``synchronized=False``) or ``"keras"``
    (``keras.layers.BatchNormalization(synchronized=True)``: keras convention only).
    ``training=False`` runs inference (no gradients). ``eager``: ``strategy.run`` called
    eagerly instead of inside a ``tf.function``. ``options``: more constructor arguments
    (``{"renorm": True}``). ``mask``: Keras's mask for the full batch (its shape without the
    last axis), split as the batch is and passed to each replica's call.
    """

    case: SyncCase
    layer: str = "bnref"
    training: bool = True
    eager: bool = False
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    mask: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.layer not in LAYERS:
            raise ValueError(f"layer must be one of {LAYERS}, got {self.layer!r}")


def run_tf_sync(cases: list[SyncCase], k: int | None = None, *, timeout: float = 240,
                eager: bool = True, engine: str = "mirrored") -> list[Synced]:
    """Each case's training step of ``bnref.tf.BatchNorm(synchronized=True)`` on its
    ``case.k`` replicas, all in one subprocess of ``k`` logical CPU devices (``case.k <= k``;
    ``engine="multiworker"``: ``k`` processes, ``case.k == k``; ``None``: the largest
    ``case.k``). Raises :class:`TfSyncError` naming every case that raised in the workers.

    ``eager=True`` (the default, for ``bnref check``'s budget) calls ``strategy.run``
    eagerly: MirroredStrategy runs the replicas in threads, with the same collectives, in
    ~0.1 s a case here; ``eager=False`` traces a ``tf.function`` per case, as training steps
    run, in ~0.5-1 s. Starting a worker (importing TensorFlow) takes ~6 s either way."""
    if k is None:
        k = max((sc.k for sc in cases), default=1)
    outcomes = run_tf_sync_jobs([Job(sc, eager=eager) for sc in cases], k, timeout=timeout,
                                engine=engine)
    errors = [outcome for outcome in outcomes if isinstance(outcome, TfSyncError)]
    if errors:
        raise TfSyncError("\n\n".join(str(error) for error in errors))
    return outcomes


def run_tf_sync_jobs(jobs: list[Job], k: int, *, timeout: float = 240,
                     engine: str = "mirrored") -> list[Synced | TfSyncError]:
    """Every job as :func:`run_tf_sync` runs its cases: a :class:`Synced` per job, or the
    :class:`TfSyncError` it raised (returned, not raised: one job's failure does not hide
    the others' results)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1 (devices, or processes with "
                         f"engine='multiworker'), got {k!r}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
    for job in jobs:
        if engine == "multiworker" and job.case.k != k:
            raise ValueError(f"every case must have k={k} workers (one replica per process), "
                             f"got {job.case!r}")
        if job.case.k > k:
            raise ValueError(f"a case of {job.case.k} workers needs more than the k={k} "
                             f"devices: {job.case!r}")
    if not jobs:
        return []
    processes = k if engine == "multiworker" else 1
    with tempfile.TemporaryDirectory(prefix="bnref-tf-sync-") as folder:
        ports = _free_ports(k) if engine == "multiworker" else []
        specs = [{"engine": engine, "k": k, "index": index, "ports": ports, "jobs": jobs,
                  "results": str(Path(folder, f"results-{index}.pkl"))}
                 for index in range(processes)]
        answers = _run_workers(specs, folder, timeout)

    def outcome(job: Job, answer: tuple[str, Any], index: int) -> Synced | TfSyncError:
        status, value = answer
        if status == "ok":
            return Synced(**value)
        return TfSyncError(f"{job!r} raised in worker {index}:\n{value}")

    per_worker = [[outcome(job, answer, index) for job, answer in zip(jobs, worker_answers,
                                                                        strict=True)]
                  for index, worker_answers in enumerate(answers)]
    return [_merge(outcomes) for outcomes in zip(*per_worker, strict=True)]


def _merge(outcomes: tuple[Synced | TfSyncError, ...]) -> Synced | TfSyncError:
    """One job's results from every worker process (each holding some of the replicas), in
    replica order: one Synced, or the first error."""
    for outcome in outcomes:
        if isinstance(outcome, TfSyncError):
            return outcome
    fields = [field.name for field in dataclasses.fields(Synced)]
    return Synced(**{name: None if getattr(outcomes[0], name) is None else
                     [value for outcome in outcomes for value in getattr(outcome, name)]
                     for name in fields})


def _free_ports(count: int) -> list[int]:
    """Ports the OS has just handed out on loopback, released for the workers to take (a
    moment in which another process could take one: the workers then fail, bounded)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _run_workers(specs: list[dict[str, Any]], folder: str, timeout: float) -> list[Any]:
    """Start a worker per spec, wait for all within ``timeout``, and return each one's
    results; when one fails or the time passes, every one still running is killed."""
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2",
               CUDA_VISIBLE_DEVICES="-1",  # the replicas are the CPU's (logical) devices
               PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                           os.environ.get("PYTHONPATH", "")]))
    procs, logs = [], []
    try:
        for spec in specs:
            spec_path = Path(folder, f"spec-{spec['index']}.pkl")
            with open(spec_path, "wb") as f:
                pickle.dump(spec, f)
            log = open(Path(folder, f"log-{spec['index']}.txt"), "w+")
            logs.append(log)
            # Output to a file, not a pipe: nobody reads a pipe while waiting, and a full
            # one would block the worker.
            procs.append(subprocess.Popen([sys.executable, "-m", "bnref.testing._sync_tf",
                                           str(spec_path)], env=env, stdout=log,
                                          stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        # Until all are done, or one fails (its peers would wait for it in a collective).
        while any(proc.poll() is None for proc in procs) and all(
                proc.poll() in (None, 0) for proc in procs):
            if time.monotonic() > deadline:
                index = next(i for i, proc in enumerate(procs) if proc.poll() is None)
                raise TimeoutError(
                    f"TensorFlow sync worker {index} of {len(procs)} did not finish in "
                    f"{timeout} s and was killed; its output ends:\n{_tail(logs[index])}")
            time.sleep(0.05)
        answers = []
        for index, (proc, spec) in enumerate(zip(procs, specs, strict=True)):
            if proc.returncode != 0 or not Path(spec["results"]).exists():
                raise TfSyncError(f"TensorFlow sync worker {index} of {len(procs)} exited "
                                  f"with {proc.returncode}; its output ends:\n"
                                  f"{_tail(logs[index])}")
            with open(spec["results"], "rb") as f:
                answers.append(pickle.load(f))
        return answers
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in logs:
            log.close()


def _tail(log: Any, size: int = 4000) -> str:
    log.seek(0)
    return log.read()[-size:]


# -- the worker -------------------------------------------------------------------------------


def _make_layer(job: Job) -> Any:
    """The job's layer, from the tf adapter's (``TfBackend.make_layer``, or the Keras
    built-in's ``builtin_layer``) for the case, re-made from its config with what a
    ``LayerConfig`` cannot say: ``synchronized``, and gamma and beta each present or not."""
    from bnref.testing._tf import TfBackend, builtin_layer
    from bnref.testing.backends import LayerConfig
    from bnref.testing.strategies import param_dtype

    case = job.case.case
    config = LayerConfig(
        num_features=case.x.shape[case.channel_axis], convention=case.convention,
        momentum=case.momentum, eps=case.eps, affine=True,
        track_running_stats=case.running_mean is not None, axis=case.axis,
        param_dtype=(case.running_mean.dtype.name if case.running_mean is not None
                     else param_dtype(case.dtype)))
    base = (builtin_layer(config) if job.layer == "keras" else TfBackend().make_layer(config)).layer
    return type(base).from_config({
        **base.get_config(), "synchronized": job.layer != "unsynchronized",
        "center": case.beta is not None, "scale": case.gamma is not None,
        "autocast": base.autocast, **job.options})


def _run_job(job: Job, strategy: Any) -> dict[str, Any]:
    """One training (or inference) step on this process's replicas: each field a list of
    numpy arrays in replica order."""
    import tensorflow as tf

    sc, case = job.case, job.case.case
    layer = _make_layer(job)
    with strategy.scope():
        layer.build(case.x.shape)
    # The case's arrays by Keras's weight names; the others (renorm's) keep their initial
    # values.
    state = {"gamma": case.gamma, "beta": case.beta, "moving_mean": case.running_mean,
             "moving_variance": case.running_var}
    layer.set_weights([np.asarray(w) if state.get(w.name) is None else state[w.name]
                       for w in layer.weights])

    def per_replica(arrays: list[np.ndarray]) -> Any:
        return strategy.experimental_distribute_values_from_function(
            lambda context: tf.constant(arrays[context.replica_id_in_sync_group]))

    gradients = job.training and sc.dy is not None
    wide = tf.float64 if case.x.dtype == np.float64 else tf.float32

    def step(x: tf.Tensor, dy: tf.Tensor | None, mask: tf.Tensor | None) -> dict[str, Any]:
        if not gradients:
            return {"y": layer(x, training=job.training, mask=mask)}
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True, mask=mask)
            # sum(y * dy) in the compute dtype: a float16 sum would round the objective.
            objective = tf.reduce_sum(tf.cast(y, wide) * tf.cast(dy, wide))
        dx, *weights = tape.gradient(objective, [x, *layer.trainable_weights])
        return {"y": y, "dx": dx, **{f"d{w.name}": g
                                     for w, g in zip(layer.trainable_weights, weights,
                                                     strict=True)}}

    run = strategy.run if job.eager else tf.function(strategy.run)
    out = run(step, args=(per_replica(sc.shards), per_replica(sc.dys) if gradients else None,
                          None if job.mask is None else per_replica(sc.split(job.mask))))
    synced = {name: [np.asarray(t) for t in strategy.experimental_local_results(value)]
              for name, value in out.items()}
    if case.running_mean is not None:  # this process's replicas' own copies
        for name, variable in (("mean", layer.moving_mean), ("var", layer.moving_variance)):
            synced[name] = [np.asarray(t)
                            for t in strategy.experimental_local_results(variable.value)]
    return synced


class _Strategies:
    """The worker's strategies, made on first use: its devices (or cluster) configured before
    TensorFlow's runtime initializes, which the first strategy does."""

    def __init__(self, spec: dict[str, Any]) -> None:
        import tensorflow as tf

        self.engine, self.made = spec["engine"], {}
        # Tiny tensors: one thread per op; several workers share the machine's cores.
        tf.config.threading.set_intra_op_parallelism_threads(1)
        if self.engine == "mirrored":
            cpu = tf.config.list_physical_devices("CPU")[0]
            tf.config.set_logical_device_configuration(
                cpu, [tf.config.LogicalDeviceConfiguration() for _ in range(spec["k"])])
        else:
            os.environ["TF_CONFIG"] = json.dumps({
                "cluster": {"worker": [f"127.0.0.1:{port}" for port in spec["ports"]]},
                "task": {"type": "worker", "index": spec["index"]}})

    def __call__(self, replicas: int) -> Any:
        import tensorflow as tf

        if replicas not in self.made:
            if self.engine == "multiworker":
                self.made[replicas] = tf.distribute.MultiWorkerMirroredStrategy()
            else:
                # Group keys of their own for each device set, as TensorFlow's tests do.
                tf.distribute.MirroredStrategy._collective_key_base += 100_000
                self.made[replicas] = tf.distribute.MirroredStrategy(
                    [f"/cpu:{j}" for j in range(replicas)])
        return self.made[replicas]


def worker(spec_path: str) -> None:
    """A worker process: every job on its strategy, recording each one's :class:`Synced`
    fields or its traceback."""
    with open(spec_path, "rb") as f:
        spec = pickle.load(f)
    strategies = _Strategies(spec)
    results = []
    for job in spec["jobs"]:
        try:
            results.append(("ok", _run_job(job, strategies(job.case.k))))
        except Exception:  # returned to the parent, which names the job
            results.append(("error", traceback.format_exc()))
    with open(spec["results"], "wb") as f:
        pickle.dump(results, f)
    if spec["engine"] == "multiworker":
        # Every worker has written its results before any leaves: a peer going away can
        # make TensorFlow's coordination service abort the others.
        strategy = strategies(spec["k"])
        strategy.reduce("SUM", strategy.run(lambda: 1.0), axis=None)


if __name__ == "__main__":
    worker(sys.argv[1])
    sys.stdout.flush()
    sys.stderr.flush()
    # The results are written: skip TensorFlow's teardown at interpreter exit (~2 s here).
    os._exit(0)
