"""A stage's code digest covers what the stage runs and writes through, nothing more: an edit to
one stage never recomputes another stage that does not import its code, and an edit to code that
two stages share recomputes both."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

DIGESTS = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, sys.argv[1])
    from pipeline.registry import get_stage_class
    out = {}
    for name in ("train", "evaluate"):
        out[name] = get_stage_class(name).code_files()  # what the runner fingerprints
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkout")
    for package in ("pipeline", "stages"):
        shutil.copytree(ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def _digests(root: Path) -> dict[str, dict[str, str]]:
    # a fresh process per state of the checkout, as a new `lmpipe run` would compute them
    proc = subprocess.run([sys.executable, "-c", DIGESTS, str(root)], capture_output=True, text=True, timeout=120, cwd="/")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def _append(path: Path, statement: str) -> None:
    path.write_text(path.read_text() + f"\n{statement}\n")


def test_train_and_evaluate_share_only_the_model_scoring_and_summaries(checkout):
    digests = _digests(checkout)
    train, evaluate = set(digests["train"]), set(digests["evaluate"])
    assert not any(f.startswith("stages/evaluate/") for f in train), sorted(train)
    assert not any(f.startswith("stages/train/") for f in evaluate), sorted(evaluate)
    assert {"stages/model/transformer.py", "stages/scoring/lm.py", "stages/summaries/train.py"} <= train & evaluate
    # train writes its checkpoints itself and its table through io: the part runner is not its code
    assert "pipeline/execute.py" not in train and {"pipeline/io.py", "pipeline/storage.py"} <= train


def test_an_edit_to_evaluate_report_code_leaves_train_unchanged_and_a_model_edit_changes_both(checkout):
    before = _digests(checkout)

    _append(checkout / "stages" / "evaluate" / "report.py", "REPORT_EDITED = True")
    after_report = _digests(checkout)
    assert after_report["train"] == before["train"]
    changed = {f for f in before["evaluate"] if before["evaluate"][f] != after_report["evaluate"][f]}
    assert changed == {"stages/evaluate/report.py"}

    _append(checkout / "stages" / "model" / "transformer.py", "MODEL_EDITED = True")
    after_model = _digests(checkout)
    for stage in ("train", "evaluate"):
        changed = {f for f in after_report[stage] if after_report[stage][f] != after_model[stage][f]}
        assert changed == {"stages/model/transformer.py"}, stage


def test_every_declared_library_is_one_the_stage_or_its_writers_import():
    """A declared library that nothing in the stage's digest imports is a typo or a stale entry:
    its version would recompute the stage for nothing."""
    import ast
    from importlib.metadata import packages_distributions

    from pipeline.code_digest import module_closure
    from pipeline.registry import all_stages

    imports_of = {top: {d.lower() for d in dists} for top, dists in packages_distributions().items()}
    for name, cls in all_stages().items():
        imported: set[str] = set()
        for _, origin in module_closure(cls.__module__, cls.writes_through, cls.presentation):
            tree = ast.parse(Path(origin).read_text())
            for node in ast.walk(tree):
                tops = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for top in tops:
                    imported |= imports_of.get(top.split(".")[0], set())
        missing = {lib for lib in cls.libraries if lib.lower() not in imported}
        assert not missing, f"stage {name!r} declares {sorted(missing)} but nothing it runs imports them"


def test_the_data_stages_do_not_depend_on_the_web_stages_through_the_assets():
    """The filters read pinned word lists through stages.assets; writing the demo corpus (which
    needs the web crawl writer) lives apart, so an edit to the web stages recomputes no filter."""
    from pipeline.registry import get_stage_class

    for name in ("language_filter", "quality_filter", "toxicity_filter", "decontaminate", "ingest"):
        files = get_stage_class(name).code_files()
        assert not [f for f in files if f.startswith("stages/web/")], (name, sorted(files))


def test_an_edit_to_how_variants_are_compared_recomputes_no_evaluation(checkout):
    """``lmpipe compare`` draws committed evaluation rows (Stage.presentation): its statistics and
    plots are not the evaluate stage's code, so changing them recomputes nothing."""
    before = _digests(checkout)
    _append(checkout / "stages" / "evaluate" / "compare.py", "COMPARE_EDITED = True")
    after = _digests(checkout)
    assert after == before
    assert "stages/evaluate/compare.py" not in before["evaluate"]


def test_presentation_modules_are_imported_only_where_outputs_are_presented():
    """A presentation module is outside the digest, so code that computes outputs must never import
    it: only compare_outputs/render_table may (else an edit there would change outputs unseen)."""
    import ast

    from pipeline.code_digest import module_closure
    from pipeline.registry import all_stages

    presenters = {"compare_outputs", "render_table"}
    for name, cls in all_stages().items():
        if not cls.presentation:
            continue
        for module, origin in module_closure(cls.__module__, (), cls.presentation):
            tree = ast.parse(Path(origin).read_text())

            def visit(node, inside: bool) -> None:
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inside = inside or node.name in presenters
                if isinstance(node, ast.ImportFrom) and not inside:
                    imported = {node.module or ""} | {f"{node.module}.{a.name}" for a in node.names}
                    assert not imported & set(cls.presentation), f"{module} imports {sorted(imported & set(cls.presentation))} outside compare_outputs/render_table ({name})"
                if isinstance(node, ast.Import) and not inside:
                    assert not {a.name for a in node.names} & set(cls.presentation), f"{module} imports a presentation module ({name})"
                for child in ast.iter_child_nodes(node):
                    visit(child, inside)

            visit(tree, False)
