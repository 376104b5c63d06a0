"""The web demo's first stages (examples/web.yaml) on the crawl `lmpipe fetch-demo-data` writes:
counts add up, a file is read as byte ranges, a rerun is cached, extraction run again is byte-identical."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import yaml

from pipeline.config import load_config
from pipeline.runner import Runner
from stages.web.pages import write_demo_crawl

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _outputs(report, names) -> dict[str, str]:
    digests = {}
    for name in names:
        stage = report.stage(name)
        for ds, info in stage.manifest["datasets"].items():
            for f in info["files"]:
                path = Path(stage.stage_dir) / f["path"]
                digests[f"{name}/{ds}/{Path(f['path']).name}"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


def test_web_example_crawl_to_filtered_text(ray_local, tmp_path):
    counts = write_demo_crawl(tmp_path / "data" / "demo" / "web")
    assert counts == {"web_pages": 49, "web_other_files": 27}
    examples = tmp_path / "examples"
    examples.mkdir()
    shutil.copy(EXAMPLES / "web-blocked-urls.txt", examples)
    config = yaml.safe_load((EXAMPLES / "web.yaml").read_text())
    first = ["crawl", "extract", "urls"]
    config["stages"] = {k: v for k, v in config["stages"].items() if k in first}
    config["mlflow"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}
    path = examples / "web.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    report = Runner(load_config(path)).run()
    crawl, extract, urls = (report.stage(n).manifest for n in first)
    assert crawl["parts"] > 2  # two files, read as byte ranges
    assert crawl["counts"]["rejected"] == {"not_a_response": 49, "not_html": 27} and crawl["counts"]["kept"] == 49
    assert extract["counts"]["rows_in"] == 49 and extract["counts"]["kept"] + extract["counts"]["rejected"].get("no_text", 0) == 49
    assert urls["counts"]["rejected"] == {"url_blocked": 2}
    for m in (crawl, extract, urls):
        c = m["counts"]
        assert c["rows_in"] == c["kept"] + sum(c["rejected"].values()) + sum(c["quarantined"].values())
    before = _outputs(report, first)

    again = Runner(load_config(path)).run()
    assert all(again.stage(n).cached for n in first)
    forced = Runner(load_config(path)).run(only="extract")  # the stage with a worker process per actor
    assert not forced.stage("extract").cached
    assert _outputs(forced, ["extract"]) == {k: v for k, v in before.items() if k.startswith("extract/")}  # the same bytes
