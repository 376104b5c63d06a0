"""The embedded MLflow store (sqlite) is created safely: two first runs at once, and a first run
that died while creating it (a full disk), leave a store every later run can use."""

from __future__ import annotations

import sqlite3
import subprocess
import sys


def _half_created(path) -> None:
    """What a first run killed by ENOSPC inside MLflow's schema migration leaves: alembic's
    temporary copy of a table, and no finished schema."""
    with sqlite3.connect(path) as db:
        db.execute("create table _alembic_tmp_experiments (experiment_id integer primary key, name varchar(256))")


def test_a_half_created_store_is_moved_aside_and_created_anew(tmp_path, caplog):
    from mlflow import MlflowClient

    from pipeline.tracking import Tracker

    db = tmp_path / "mlflow.db"
    _half_created(db)
    broken = tmp_path / "copy.db"
    _half_created(broken)
    try:  # what every later run met before: MLflow cannot create its schema over the leftover
        MlflowClient(tracking_uri=f"sqlite:///{broken}").search_experiments()
        raise AssertionError("MLflow opened a half-created store")
    except Exception as e:
        assert "_alembic_tmp_experiments" in str(e) and "already exists" in str(e)

    tracker = Tracker(f"sqlite:///{db}", "exp")
    run_id = tracker.start_pipeline("p", str(tmp_path / "p.yaml"), "name: p", params={}, tags={})
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    aside = list(tmp_path.glob("mlflow.db.incomplete-*"))
    assert len(aside) == 1 and "moved it aside" in caplog.text  # kept for inspection, not deleted


def test_a_store_with_runs_and_leftover_tables_is_not_touched(tmp_path):
    import pytest

    from pipeline.tracking import Tracker

    db = tmp_path / "mlflow.db"
    tracker = Tracker(f"sqlite:///{db}", "exp")
    tracker.start_pipeline("p", str(tmp_path / "p.yaml"), "name: p", params={}, tags={})
    _half_created(db)
    with pytest.raises(RuntimeError, match="holds 1 runs but an interrupted schema migration left"):
        Tracker(f"sqlite:///{db}", "exp")
    assert db.exists() and not list(tmp_path.glob("*.incomplete-*"))


def test_two_first_runs_at_once_both_get_the_store(tmp_path):
    code = ("import sys; from pipeline.tracking import Tracker; "
            "t = Tracker(f'sqlite:///{sys.argv[1]}', 'exp'); t.start_pipeline('p', 'p.yaml', 'name: p', params={}, tags={})")
    procs = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "mlflow.db")], stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [e[-1500:] for e in errors]
    from mlflow import MlflowClient

    runs = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").search_runs(["1"])
    assert len(runs) == 3


# A full disk, simulated: every SQLite connection of MLflow's store creation may hold 50 pages (200 KB)
FULL_DISK = """
import sqlite3, sys
_connect = sqlite3.connect
def connect(*args, **kwargs):
    db = _connect(*args, **kwargs)
    db.execute("PRAGMA max_page_count = 50")
    return db
sqlite3.connect = sqlite3.dbapi2.connect = connect
from mlflow import MlflowClient
MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}").search_experiments()
"""


def test_a_store_whose_creation_ran_out_of_disk_is_recognised_by_its_tables(tmp_path, caplog):
    """The disk fills while MLflow creates the store: a migration stops half-way, after the version
    row of the one before it was written. Every later run failed with "table ... already exists"
    (MLflow sees tables missing and replays the migration); the store must be moved aside instead."""
    from pipeline.tracking import Tracker

    db = tmp_path / "mlflow.db"
    full = subprocess.run([sys.executable, "-c", FULL_DISK, str(db)], capture_output=True, text=True, timeout=180)
    assert full.returncode != 0 and "database or disk is full" in full.stderr
    with sqlite3.connect(db) as conn:  # the half-made store has a schema version: not what the old check looked for
        assert conn.execute("select count(*) from alembic_version").fetchone()[0] == 1
        assert not [r for r in conn.execute("select name from sqlite_master where name like '_alembic_tmp_%'")]

    tracker = Tracker(f"sqlite:///{db}", "exp")
    run_id = tracker.start_pipeline("p", str(tmp_path / "p.yaml"), "name: p", params={}, tags={})
    assert tracker.client.get_run(run_id).info.status == "RUNNING"
    assert len(list(tmp_path.glob("mlflow.db.incomplete-*"))) == 1
    assert "tables missing at revision" in caplog.text and "moved it aside" in caplog.text


def test_the_experiment_opens_in_mlflows_model_development_view(tmp_path):
    """MLflow 3 opens an experiment without ``mlflow.experimentKind`` in its GenAI view; lmpipe marks
    its experiments as model development, and leaves a kind a user chose alone."""
    from pipeline.tracking import EXPERIMENT_KIND_TAG, Tracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = Tracker(uri, "exp")
    assert tracker.client.get_experiment(tracker.experiment_id).tags[EXPERIMENT_KIND_TAG] == "custom_model_development"
    tracker.client.set_experiment_tag(tracker.experiment_id, EXPERIMENT_KIND_TAG, "finetuning")
    again = Tracker(uri, "exp")
    assert again.client.get_experiment(again.experiment_id).tags[EXPERIMENT_KIND_TAG] == "finetuning"


def test_a_new_store_is_a_copy_of_an_empty_one_made_once(tmp_path, monkeypatch):
    """MLflow creates a store by replaying every schema migration (2-3 CPU-s in every new
    work_dir); lmpipe makes an empty one once per MLflow version and copies it. The copy is the
    store MLflow makes: the same tables, schema revision and Default experiment."""
    from mlflow import MlflowClient

    from pipeline.tracking import Tracker, _default_artifact_location

    monkeypatch.setenv("LMPIPE_HOME", str(tmp_path / "home"))
    Tracker(f"sqlite:///{tmp_path / 'a' / 'mlflow.db'}", "exp")
    templates = list((tmp_path / "home" / "mlflow-stores").glob("empty-*.db"))
    assert len(templates) == 1
    copied = tmp_path / "b" / "mlflow.db"
    tracker = Tracker(f"sqlite:///{copied}", "exp")
    run_id = tracker.start_pipeline("p", str(tmp_path / "p.yaml"), "name: p", params={}, tags={})
    assert tracker.client.get_run(run_id).info.status == "RUNNING"

    made = tmp_path / "c" / "mlflow.db"
    made.parent.mkdir()
    MlflowClient(tracking_uri=f"sqlite:///{made}").search_experiments()  # MLflow's own creation

    def schema(path):
        """Tables with their columns, indexes with their columns, the revision, the Default experiment
        (not the CREATE statements' text: MLflow's own creation words those differently from one
        process state to another)."""
        with sqlite3.connect(path) as db:
            names = db.execute("select type, name, tbl_name from sqlite_master where name not like 'sqlite_%'").fetchall()
            columns = {name: db.execute(f"pragma {'table' if kind == 'table' else 'index'}_xinfo('{name}')").fetchall()
                       for kind, name, _ in names if kind in ("table", "index")}
            return (sorted(names), columns, db.execute("select version_num from alembic_version").fetchall(),
                    db.execute("select name, artifact_location, lifecycle_stage from experiments where experiment_id = 0").fetchall())

    copied_schema, made_schema = schema(copied), schema(made)
    assert copied_schema[:3] == made_schema[:3]
    assert copied_schema[3] == made_schema[3] == [("Default", _default_artifact_location(), "active")]
    assert not list((tmp_path / "b").glob("*.part-*")) and not list(templates[0].parent.glob("*.part-*"))
