"""Settings that only change speed or memory (dedup's partitions and kept work files, tokenize's
encode batch and threads) change no byte of the outputs, so they are left out of fingerprints:
tuning them reuses the cache instead of recomputing everything downstream."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.config import load_config
from pipeline.runner import Runner
from stages.assets import python_doc_topics

PIPELINE = """
name: perf
work_dir: {work}
seed: 5
stages:
  ingest:
    uses: ingest
    config:
      sources: [{{name: docs, paths: ["{data}/*.jsonl"]}}]
  exact:
    uses: exact_dedup
    inputs: [ingest]
    config: {{num_partitions: {partitions}, keep_work: {keep}}}
  near:
    uses: minhash_dedup
    inputs: [exact]
    config: {{num_partitions: {partitions}, keep_work: {keep}}}
  tokenizer:
    uses: train_tokenizer
    inputs: [near]
    config: {{vocab_size: 400}}
  tokenize:
    uses: tokenize
    inputs: [near, tokenizer]
    config: {{seq_len: 64, validation_fraction: 0.1, shard_sequences: 50, batch_rows: {batch}, threads_per_worker: {threads}}}
"""


def _corpus(folder: Path) -> Path:
    """Real text with exact and near duplicates, in two files."""
    texts = list(python_doc_topics().values())[:40]
    near = [t.replace(" the ", " a ", 1) for t in texts[:10]]  # one word changed: near duplicates
    docs = texts + texts[:5] + near
    folder.mkdir(parents=True)
    for k in range(2):
        (folder / f"part-{k}.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs[k::2]))
    return folder


def _run(tmp: Path, data: Path, work: Path, **settings):
    path = tmp / f"p-{len(list(tmp.glob('p-*.yaml')))}.yaml"
    path.write_text(PIPELINE.format(work=work, data=data, **settings))
    return Runner(load_config(str(path)), use_ray=False, track=False).run()


def _digests(report) -> dict[str, dict[str, str]]:
    out = {}
    for s in report.stages:
        files = {}
        for ds, info in s.manifest["datasets"].items():
            for f in info["files"]:
                rel = f["path"].split("/", 1)[1]  # below the attempt folder
                files[f"{ds}/{rel}"] = hashlib.sha256((Path(s.stage_dir) / f["path"]).read_bytes()).hexdigest()
        out[s.name] = files
    return out


def test_performance_settings_change_no_output_byte_and_reuse_the_cache(tmp_path):
    data = _corpus(tmp_path / "data")
    a = _run(tmp_path, data, tmp_path / "a", partitions=1, keep="false", batch=1024, threads=1)
    b = _run(tmp_path, data, tmp_path / "b", partitions=3, keep="true", batch=7, threads=2)
    assert a.stage("exact").manifest["counts"]["rejected"] and a.stage("near").manifest["counts"]["rejected"]  # duplicates found
    assert b.stage("exact").manifest["summary"]["data"]["partitions"] == 3 and a.stage("exact").manifest["summary"]["data"]["partitions"] == 1
    assert _digests(a) == _digests(b)  # every file every manifest lists: byte-identical
    assert [s.fingerprint for s in a.stages] == [s.fingerprint for s in b.stages]

    # in one work dir, changing them reruns nothing
    again = _run(tmp_path, data, tmp_path / "a", partitions=3, keep="true", batch=7, threads=2)
    assert all(s.cached for s in again.stages)
