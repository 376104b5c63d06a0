"""TokenShardLoader batches/s on local memory-mapped shards (random uint16 tokens), one process.

    .venv/bin/python bench/tokenize_loader_bench.py [--out bench/results/loader.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sequences", type=int, default=40_000)
    ap.add_argument("--out", default=str(REPO / "bench/results/loader.json"))
    args = ap.parse_args()

    import numpy as np
    import pyarrow as pa

    from stages.tokenize.loader import TokenShardLoader

    tmp = Path(tempfile.mkdtemp(prefix="loaderbench-"))
    results = []
    for seq_len, batch in ((1024, 32), (2048, 8), (2048, 64)):
        rng = np.random.default_rng(0)
        files = []
        per = 8192
        for k in range(0, args.sequences, per):
            n = min(per, args.sequences - k)
            tokens = rng.integers(0, 50000, size=n * (seq_len + 1), dtype=np.uint16)
            table = pa.table({"tokens": pa.FixedSizeListArray.from_arrays(pa.array(tokens), seq_len + 1)})
            path = tmp / f"s{seq_len}-{k}.arrow"
            with pa.OSFile(str(path), "wb") as f, pa.ipc.new_file(f, table.schema) as w:
                w.write_table(table)
            files.append(str(path))
        loader = TokenShardLoader(files, batch_size=batch, seed=0)
        it = iter(loader)
        next(it)
        n = 300
        t = time.perf_counter()
        for _ in range(n):
            next(it)
        dt = time.perf_counter() - t
        results.append({"seq_len": seq_len, "batch_size": batch, "batches_per_s": n / dt, "tokens_per_s": n * batch * seq_len / dt})
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
