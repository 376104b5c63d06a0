"""``lmpipe submit``: run a pipeline on a Ray cluster as a Ray job (Ray Jobs API)."""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Optional

from pipeline.config import load_config

# Never uploaded: data, caches, outputs, VCS and environments (Ray's upload limit is 100 MiB).
EXCLUDES = [
    ".git", ".venv", "venv", "**/__pycache__", "*.pyc", ".cache", "data", "work", "mlruns", "mlartifacts",
    "*.db", ".pytest_cache", "*.egg-info", ".lmpipe", "node_modules", "*.parquet", "*.arrow",
]


def auth_headers() -> dict[str, str]:
    """Ray token auth (on by default since 2.52 on clusters that enable it): send the token if we have one."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        token = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
    default = Path.home() / ".ray" / "auth_token"
    if not token and default.exists():
        token = default.read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


# The job's shell runs under Ray's job supervisor, whose interpreter is the one the cluster's Ray
# runs on (a `ray start` from an environment that was not activated leaves that environment off
# the PATH: `python` is then another interpreter, without lmpipe's dependencies). The supervisor
# has Ray's compiled module mapped; the environment that holds it has the right python.
RAY_PYTHON = (
    'py=""; so="$(grep -o "/[^ ]*/site-packages/ray/_raylet.so" /proc/$PPID/maps 2>/dev/null | head -n 1)"; '
    'if [ -n "$so" ]; then root="${so%/lib/python*}"; [ -x "$root/bin/python" ] && py="$root/bin/python"; fi; '
    '[ -n "$py" ] || py=python'
)
CHECK_PYTHON = (
    '"$py" -c "import fsspec, pyarrow, pydantic, ray, yaml" 2>/dev/null || '
    '{ echo "lmpipe: error: this job would run with $py ($(command -v "$py" || echo not found)), which lacks lmpipe'"'"'s'
    ' dependencies: start Ray from lmpipe'"'"'s environment (. .venv/bin/activate && ray start ...) or give lmpipe submit'
    ' --python PATH" >&2; exit 3; }'
)


def choose_python(python: Optional[str]) -> str:
    """Shell that sets $py: the given interpreter, else the one the cluster's Ray runs on."""
    return f"py={shlex.quote(python)}" if python else RAY_PYTHON


def submit(config_path: str, address: str, wait: bool = True, python: Optional[str] = None,
           extra_args: Optional[list[str]] = None, timeout: Optional[float] = None) -> int:
    """Submit ``lmpipe run`` of a pipeline file to a cluster; follow its logs unless ``wait`` is False.

    The job uploads only the pipeline file (as written: ``${VAR}`` references stay references) and
    this checkout's ``pipeline`` and ``stages`` packages (``py_modules``), so the cluster runs the
    same lmpipe code as the submitter. Secrets are never sent: the cluster's environment (or its
    cloud role) provides them.
    """
    import tempfile

    from ray.job_submission import JobSubmissionClient

    import pipeline as pipeline_pkg

    from pipeline.preflight import check_dashboard_address

    loaded = load_config(config_path)  # validate before submitting anything
    check_dashboard_address(address)  # seconds, naming the address, where Ray would retry for minutes
    # Relative paths keep meaning what they mean here (a local or shared filesystem); on remote
    # clusters use s3:// paths.
    base_dir = os.path.dirname(os.path.abspath(config_path))
    # the staged folder is uploaded by submit_job; it is removed whether or not the submit succeeds
    with tempfile.TemporaryDirectory(prefix="lmpipe-submit-") as staging:
        Path(staging, "pipeline.yaml").write_text(loaded.text)
        args = ["-m", "pipeline.cli", "--traceback", "run", "pipeline.yaml", "--address", "auto", "--base-dir", base_dir, *(extra_args or [])]
        # Run from a folder Ray does not manage: Ray may garbage-collect the job's unpacked working_dir
        # while the job still runs (seen when Ray Train's controller exits), and code that calls
        # os.getcwd() (torch._dynamo's config) then fails with FileNotFoundError.
        entrypoint = (
            f"{choose_python(python)}; {CHECK_PYTHON} && "
            'd="$(mktemp -d -t lmpipe-job-XXXXXX)" && cp pipeline.yaml "$d/" && cd "$d" && exec "$py" '
            + " ".join(shlex.quote(c) for c in args)
        )
        client = JobSubmissionClient(address, headers=auth_headers() or None)
        runtime_env = {
            "working_dir": staging,
            "py_modules": [os.path.dirname(pipeline_pkg.__file__), _package_folder("stages")],
            "excludes": EXCLUDES,
        }
        metadata = {"lmpipe.pipeline": loaded.declared.name, "lmpipe.config": os.path.abspath(config_path)}
        delay = 1.0
        deadline = time.time() + 120
        while True:
            try:
                job_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env, metadata=metadata)
                break
            except RuntimeError as e:  # a head that just started has no job agent yet: retry with backoff
                if "No available agent" not in str(e) or time.time() > deadline:
                    raise
                print(f"the cluster's job agent is not ready yet; retrying in {delay:.0f}s", flush=True)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
    print(f"submitted job {job_id} to {address}: {entrypoint}", flush=True)
    if not wait:
        return 0
    return follow(client, job_id, timeout)


def follow(client, job_id: str, timeout: Optional[float] = None) -> int:
    """Print a job's logs as they grow until it ends; 0 if it succeeded."""
    from ray.job_submission import JobStatus

    printed = 0
    started = time.time()
    terminal = {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}
    while True:
        status = client.get_job_status(job_id)
        logs = client.get_job_logs(job_id)
        if len(logs) > printed:
            sys.stdout.write(logs[printed:])
            sys.stdout.flush()
            printed = len(logs)
        if status in terminal:
            break
        if timeout is not None and time.time() - started > timeout:
            print(f"job {job_id}: still {status} after {timeout}s; stopping it", flush=True)
            client.stop_job(job_id)
            return 1
        time.sleep(1.0)
    print(f"job {job_id}: {status}", flush=True)
    return 0 if status == JobStatus.SUCCEEDED else 1


def _package_folder(name: str) -> str:
    """The folder of a top-level package, found without importing it (submit uploads the stages'
    code; it does not run it)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"package {name!r} is not importable from here")
    return list(spec.submodule_search_locations)[0]
