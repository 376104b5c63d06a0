"""FanOut, the one way a stage runs work in parallel: tasks and long-lived workers on Ray, a worker
that dies is replaced and its item rerun, a failed setup is the item's one-line error."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from pipeline.fanout import FanOut


def die_once(marker: str, value: int) -> tuple[int, int]:
    """Kill this worker process the first time (no exception: the process is gone), then work."""
    if not os.path.exists(marker):
        Path(marker).write_text("died")
        os._exit(1)
    return value * 10, os.getpid()


def setup_counting(folder: str) -> dict:
    """A worker's state; each call leaves a file, so the test counts setups per process."""
    Path(folder, f"setup-{os.getpid()}").write_text("")
    return {"pid": os.getpid(), "items": 0}


def use_state(state: dict, value: int) -> tuple[int, int, int]:
    state["items"] += 1
    return value * 10, state["pid"], state["items"]


def times_ten(value: int) -> int:
    return value * 10


def setup_failing() -> None:
    raise FileNotFoundError("blocklist /data/words.txt is missing")


def test_a_task_whose_worker_dies_is_rerun(ray_local, tmp_path):
    fan_out = FanOut("s", on_ray=True)
    out = fan_out.map(die_once, [(str(tmp_path / "died"), i) for i in range(3)], step="work", max_parallel=1)
    assert [v for v, _ in out] == [0, 10, 20]
    assert (tmp_path / "died").exists()  # one worker did die


def test_a_long_lived_worker_that_dies_is_restarted_and_its_item_rerun(ray_local, tmp_path):
    fan_out = FanOut("s", on_ray=True)
    marker = str(tmp_path / "died")
    out = fan_out.map_on_workers(lambda: None, lambda _state, i: die_once(marker, i), [(i,) for i in range(3)], step="work",
                                 workers=1, num_cpus=1)
    assert [v for v, _ in out] == [0, 10, 20]
    assert (tmp_path / "died").exists()


def test_long_lived_workers_set_up_once_each_and_return_results_in_item_order(ray_local, tmp_path):
    fan_out = FanOut("s", on_ray=True)
    seen = []
    out = fan_out.map_on_workers(lambda: setup_counting(str(tmp_path)), use_state, [(i,) for i in range(8)], step="work", workers=2,
                                 num_cpus=1, on_result=lambda result, done, total: seen.append((done, total)))
    assert [v for v, _, _ in out] == [i * 10 for i in range(8)]
    pids = {pid for _, pid, _ in out}
    setups = sorted(p.name for p in tmp_path.glob("setup-*"))
    assert setups == sorted(f"setup-{pid}" for pid in pids)  # one setup per worker, not one per item
    assert len(pids) <= 2 and max(n for _, _, n in out) >= 4  # the 8 items shared 2 workers
    assert seen == [(i, 8) for i in range(1, 9)]


def test_a_failed_setup_is_the_items_error_as_itself(ray_local):
    fan_out = FanOut("s", on_ray=True)
    with pytest.raises(FileNotFoundError, match=r"^blocklist /data/words.txt is missing$"):
        fan_out.map_on_workers(setup_failing, use_state, [(1,), (2,)], step="work", workers=2, num_cpus=1)


def test_a_check_that_raises_stops_the_workers(ray_local, tmp_path):
    """The runner's check (its lease) raises: nothing more is submitted, the workers go."""
    class LeaseLost(RuntimeError):
        pass

    def lost():
        raise LeaseLost("lease lost")

    fan_out = FanOut("s", on_ray=True, check=lost)
    with pytest.raises(LeaseLost):
        fan_out.map_on_workers(lambda: setup_counting(str(tmp_path)), use_state, [(i,) for i in range(6)], step="work", workers=1,
                               num_cpus=1)
    assert len(list(tmp_path.glob("setup-*"))) == 1
    with pytest.raises(LeaseLost):
        fan_out.map(times_ten, [(i,) for i in range(6)], step="work", max_parallel=1)
    deadline = time.monotonic() + 30
    while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"]:  # the worker's CPU is back
        assert time.monotonic() < deadline, ray_local.available_resources()
        time.sleep(0.2)
