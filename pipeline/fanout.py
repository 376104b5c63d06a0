"""The one way a stage runs work in parallel (``ctx.fan_out``; ``ctx.run_parts`` is built on it).

Three shapes cover the stages' needs:

* :meth:`FanOut.map` -- ``fn(*args)`` for every item, as Ray tasks with the resources of one
  task, at most ``max_parallel`` at once, retried when a worker dies, results in item order,
  progress logged as items finish. Encode/pack/shard writers, evaluation jobs, dedup's key pass,
  and the parts of a stage whose ``setup()`` is cheap.
* :meth:`FanOut.map_on_workers` -- the same over a pool of long-lived workers (Ray actors with the
  resources of one task): ``state = setup()`` once per worker, then ``fn(state, *args)`` per item.
  The parts of a stage whose ``setup()`` is expensive (a model, a tokenizer, an n-gram index).
* :meth:`FanOut.exchange` -- an all-to-all step over P partitions: task k receives the blocks
  addressed to partition k, returns one block per destination partition plus its stats. Blocks
  stay in Ray's object store between steps; the driver holds references and stats only
  (dedup's shuffles and connected components).

Without Ray (``Runner(use_ray=False)``, unit tests) both run the same functions in this process.
A task's exception reaches the stage as itself (not wrapped in Ray's error), so a stage's
user-facing errors (a corrupt checkpoint, a bad file) stay one clear line.
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger("lmpipe")

PROGRESS_EVERY_S = 5.0
FRESH_WORKERS_ENV = "LMPIPE_FRESH_WORKERS"

OnResult = Callable[[Any, int, int], None]  # (an item's result, items done, items in all)


class _Progress:
    def __init__(self, stage: str, step: str, total: int):
        self.stage, self.step, self.total = stage, step, total
        self.started = self.last = time.perf_counter()
        self.done = 0

    def report(self, _result: Any, done: int, _total: int) -> None:
        self.done = done
        now = time.perf_counter()
        if self.done != self.total and now - self.last < PROGRESS_EVERY_S:
            return
        self.last = now
        elapsed = now - self.started
        eta = elapsed / self.done * (self.total - self.done)
        log.info("[%s] %s: %d/%d tasks done in %.1fs, ETA %.0fs", self.stage, self.step, self.done, self.total, elapsed, eta)


def _unwrap(error: BaseException) -> BaseException:
    """The exception a task raised, without Ray's wrapper (its traceback text stays in the logs)."""
    cause = getattr(error, "cause", None)
    return cause if isinstance(cause, BaseException) else error


class FanOut:
    """Parallel work of one stage: on Ray when the runner runs on Ray, else in this process."""

    def __init__(self, stage_name: str, on_ray: bool, check: Optional[Callable[[], None]] = None,
                 fresh_workers: Optional[bool] = None):
        self.stage_name = stage_name
        self.on_ray = on_ray
        # Ray runs tasks in worker processes it keeps for the run (imports paid once); with
        # LMPIPE_FRESH_WORKERS=1 every task gets a new process: to rule out state that a stage
        # keeps between parts, or to compare against
        self.fresh_workers = os.environ.get(FRESH_WORKERS_ENV) == "1" if fresh_workers is None else fresh_workers
        # called as tasks finish; raises to stop the stage (the runner's: its lease was lost)
        self.check: Callable[[], None] = check or (lambda: None)

    def cluster_resources(self) -> dict[str, float]:
        """What the tasks can run on: the Ray cluster's resources (CPU, GPU, custom), or one CPU
        in process (items run one after another)."""
        if not self.on_ray:
            return {"CPU": 1.0}
        import ray

        return {k: float(v) for k, v in ray.cluster_resources().items()}

    def map(self, fn: Callable[..., Any], items: Sequence[tuple], *, step: str, num_cpus: float = 1.0, num_gpus: float = 0.0,
            resources: Optional[dict[str, float]] = None, env: Optional[dict[str, str]] = None,
            max_parallel: Optional[int] = None, retries: int = 1, on_result: Optional[OnResult] = None) -> list[Any]:
        """``[fn(*item) for item in items]``, in parallel; ``retries``: times a task is rerun when
        its worker dies (a task that raises is not rerun: data errors are not transient).
        ``on_result(result, done, total)``, on the driver as items finish (in the order they
        finish), replaces the progress lines: the caller reports progress itself."""
        report = on_result or _Progress(self.stage_name, step, len(items)).report
        if not self.on_ray:
            out = []
            for item in items:
                out.append(fn(*item))
                report(out[-1], len(out), len(items))
                self.check()
            return out
        import ray

        options: dict[str, Any] = {"num_cpus": num_cpus, "max_retries": retries, "name": f"{self.stage_name}.{step}"}
        if num_gpus:
            options["num_gpus"] = num_gpus
        if resources:
            options["resources"] = dict(resources)
        if env:
            options["runtime_env"] = {"env_vars": dict(env)}
        remote = _remote_function(fn, fresh_workers=self.fresh_workers).options(**options)
        limit = max_parallel or len(items) or 1
        refs: list[Any] = []
        pending: list[Any] = []
        done = 0
        try:
            for item in items:
                while len(pending) >= limit:
                    ready, pending = ray.wait(pending, num_returns=1)
                    done += 1
                    report(ray.get(ready[0]), done, len(items))  # fail fast: a failed task stops the submission of more
                    self.check()
                ref = remote.remote(*item)
                refs.append(ref)
                pending.append(ref)
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                done += 1
                report(ray.get(ready[0]), done, len(items))
                self.check()
            return ray.get(refs)
        except ray.exceptions.RayTaskError as e:
            for ref in pending:
                ray.cancel(ref, force=False)
            raise _unwrap(e) from None
        except BaseException:  # stopped (a lost lease, an interrupt): the remaining tasks are not needed
            for ref in pending:
                ray.cancel(ref, force=False)
            raise

    def map_on_workers(self, setup: Callable[[], Any], fn: Callable[..., Any], items: Sequence[tuple], *, step: str, workers: int,
                       num_cpus: float = 1.0, num_gpus: float = 0.0, resources: Optional[dict[str, float]] = None,
                       retries: int = 1, on_result: Optional[OnResult] = None) -> list[Any]:
        """``[fn(state, *item) for item in items]`` on ``workers`` long-lived workers, each with its
        own ``state = setup()`` made once; results in item order. A worker that dies is restarted
        (its ``setup()`` runs again) and its item rerun, ``retries`` times; an item that raises is
        not rerun. The workers hold their resources until every item is done, then exit."""
        report = on_result or _Progress(self.stage_name, step, len(items)).report
        if not self.on_ray:
            state = setup()
            out = []
            for item in items:
                out.append(fn(state, *item))
                report(out[-1], len(out), len(items))
                self.check()
            return out
        if not items:
            return []
        import ray

        global _POOL_WORKER
        if _POOL_WORKER is None:  # exported to the cluster once per driver
            _POOL_WORKER = ray.remote(_PoolWorker)
        options: dict[str, Any] = {"num_cpus": num_cpus, "max_restarts": retries, "max_task_retries": retries}
        if num_gpus:
            options["num_gpus"] = num_gpus
        if resources:
            options["resources"] = dict(resources)
        pool = [_POOL_WORKER.options(**options).remote(setup) for _ in range(max(1, min(workers, len(items))))]
        idle = list(pool)
        results: list[Any] = [None] * len(items)
        pending: dict[Any, tuple[int, Any]] = {}  # task -> (its item's index, its worker)
        done = 0

        def finish_one() -> None:  # wait for one task: its result in place, its worker idle again
            nonlocal done
            [ref], _ = ray.wait(list(pending), num_returns=1)
            index, worker = pending.pop(ref)
            results[index] = ray.get(ref)
            idle.append(worker)
            done += 1
            report(results[index], done, len(items))
            self.check()

        try:
            for index, item in enumerate(items):
                if not idle:
                    finish_one()
                worker = idle.pop()
                pending[worker.run.options(name=f"{self.stage_name}.{step}").remote(fn, *item)] = (index, worker)
            while pending:
                finish_one()
            return results
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None
        finally:  # done, failed or stopped (a lost lease): the workers and their resources go
            for worker in pool:
                ray.kill(worker, no_restart=True)

    def exchange(self, fn: Callable[..., tuple[list, dict]], inputs: list[list[Any]], partitions: int, *args: Any,
                 step: Optional[str] = None, num_cpus: float = 1.0) -> tuple[list[list[Any]], list[dict[str, Any]]]:
        """One all-to-all step: ``fn(blocks, k, partitions, *args) -> (one block per partition, stats)``
        for every partition k; returns the blocks each partition receives and every task's stats.
        ``step`` names the tasks (default: the function's name)."""
        step = step or getattr(fn, "__name__", "exchange")
        if not self.on_ray:
            received: list[list[Any]] = [[] for _ in range(partitions)]
            stats = []
            for k in range(partitions):
                outs, st = fn(inputs[k], k, partitions, *args)
                for j in range(partitions):
                    received[j].append(outs[j])
                stats.append(st)
                self.check()
            return received, stats
        import ray

        global _EXCHANGE_TASK
        if _EXCHANGE_TASK is None:  # exported to the cluster once per driver, not once per step
            _EXCHANGE_TASK = ray.remote(_exchange_task)
        task = _EXCHANGE_TASK.options(num_cpus=num_cpus, num_returns=partitions + 1, name=f"{self.stage_name}.{step}")
        refs = [task.remote(fn, k, partitions, args, *inputs[k]) for k in range(partitions)]
        try:
            stats = ray.get([r[partitions] for r in refs])
        except ray.exceptions.RayTaskError as e:
            raise _unwrap(e) from None
        self.check()
        return [[refs[k][j] for k in range(partitions)] for j in range(partitions)], stats


_EXCHANGE_TASK = None
_REMOTE_FUNCTIONS: dict[tuple[Callable[..., Any], bool], Any] = {}


def _remote_function(fn: Callable[..., Any], fresh_workers: bool) -> Any:
    """``ray.remote(fn)``, made once per module-level function: Ray exports a remote function to
    the cluster once, and workers that have loaded it keep it (a stage's parts, every stage's
    parts, run the same function); a closure is exported with each call. ``fresh_workers``: a
    worker process exits after one task of it (``max_calls=1``)."""
    import ray

    options = {"max_calls": 1} if fresh_workers else {}
    if "<" in getattr(fn, "__qualname__", "<"):  # a lambda or a local function: new each time
        return ray.remote(**options)(fn) if options else ray.remote(fn)
    key = (fn, fresh_workers)
    if key not in _REMOTE_FUNCTIONS:
        _REMOTE_FUNCTIONS[key] = ray.remote(**options)(fn) if options else ray.remote(fn)
    return _REMOTE_FUNCTIONS[key]
_POOL_WORKER = None


class _PoolWorker:
    """One long-lived worker of :meth:`FanOut.map_on_workers`: its state made once, then items."""

    def __init__(self, setup: Callable[[], Any]):
        # a failed setup is raised by the worker's first item, as that task's error (one line on
        # the driver), not as a dead actor's dump
        self.state, self.setup_error = None, None
        try:
            self.state = setup()
        except Exception as e:
            self.setup_error = e

    def run(self, fn: Callable[..., Any], *item: Any) -> Any:
        if self.setup_error is not None:
            raise self.setup_error
        return fn(self.state, *item)


def _exchange_task(fn, k: int, partitions: int, args: tuple, *blocks):
    outs, stats = fn(list(blocks), k, partitions, *args)
    return (*outs, stats)
