"""Recall/precision at threshold 0.8 on planted near-duplicates of real articles, and agreement
with datasketch.MinHashLSH on the same signatures and (b, r).

    .venv/bin/python bench/dedup_quality.py
"""

from __future__ import annotations

import random

import numpy as np
from datasketch import MinHash, MinHashLSH

from stages.assets import news_articles
from stages.dedup.components import connected_components
from stages.dedup.engine import bucket_edges
from stages.dedup.lsh import band_keys, optimal_param
from stages.dedup.minhash import MinHasher, ShingleConfig, reference_shingles, shingle_hashes

EDITS = [0.005, 0.01, 0.02, 0.05, 0.1]


def planted(n_base: int, rng: random.Random) -> list[str]:
    arts = [a["text"] for a in news_articles() if len(a["text"].split()) >= 200][:n_base]
    docs = list(arts)
    for i, text in enumerate(arts):
        words = text.split()
        kind = i % 4
        level = EDITS[i % 5]
        if kind == 0:  # random word edits
            for _ in range(int(len(words) * level)):
                words[rng.randrange(len(words))] = rng.choice(["alpha", "beta", "gamma", "delta"])
        elif kind == 1:  # a deleted sentence span
            k = max(1, int(len(words) * level))
            s = rng.randrange(len(words) - k)
            del words[s : s + k]
        elif kind == 2:  # boilerplate header added
            words = ("Subscribe to our newsletter for the latest updates and offers " * max(1, int(level * 20))).split() + words
        else:  # two paragraphs swapped
            cut = len(words) // 3
            words = words[cut : 2 * cut] + words[:cut] + words[2 * cut :]
        docs.append(" ".join(words))
    return docs


def removed_by_lsh(sigs, b, r, verify=None):
    keys = band_keys(sigs, b, r)
    uid = np.arange(len(sigs), dtype=np.int64)
    src, dst = bucket_edges(keys.ravel().view(np.int64), np.repeat(uid, b))
    if verify is not None:
        keep = (sigs[src.astype(np.int64)] == sigs[dst.astype(np.int64)]).mean(axis=1) >= verify
        src, dst = src[keep], dst[keep]
    nodes, comp, _ = connected_components(src, dst)
    return {int(n): int(c) for n, c in zip(nodes, comp) if n != c}


def main() -> None:
    rng = random.Random(11)
    n_base = 1000
    docs = planted(n_base, rng)
    cfg = ShingleConfig()
    sigs = MinHasher().signatures(*shingle_hashes(docs, cfg))
    sets = [set(reference_shingles(d, cfg)) for d in docs]

    def jaccard(i, j):
        return len(sets[i] & sets[j]) / len(sets[i] | sets[j])

    truth = {n_base + i for i in range(n_base) if jaccard(i, n_base + i) >= 0.8}
    print(f"{len(docs)} documents, {len(truth)} planted pairs with true Jaccard >= 0.8")
    for label, weights, verify in [("datasketch weights (0.5, 0.5), no verification", (0.5, 0.5), None),
                                   ("lmpipe default: weights (0.05, 0.95), verify >= 0.75", (0.05, 0.95), 0.75)]:
        b, r = optimal_param(0.8, 128, *weights)
        removed = removed_by_lsh(sigs, b, r, verify)
        recall = len(truth & set(removed)) / len(truth)
        precision = sum(jaccard(d, k) >= 0.7 for d, k in removed.items()) / max(1, len(removed))
        print(f"{label}: b={b} r={r} removed={len(removed)} recall={recall:.3f} precision={precision:.3f}")
        if verify is None:
            lsh = MinHashLSH(threshold=0.8, num_perm=128, params=(b, r))
            ds_removed = set()
            for i, s in enumerate(sigs):
                m = MinHash(num_perm=128, seed=1, hashvalues=s, scheme="affine32")
                if lsh.query(m):
                    ds_removed.add(i)  # a later document that matches an indexed one
                lsh.insert(i, m)
            # datasketch's greedy query-then-insert removes the later doc of each candidate pair;
            # lmpipe keeps the smallest uid of each component: compare as sets of removed docs
            ours = set(removed)
            overlap = len(ours & ds_removed) / max(1, len(ours | ds_removed))
            print(f"  agreement with datasketch.MinHashLSH (same b, r): {len(ours)} vs {len(ds_removed)} removed, Jaccard of removed sets {overlap:.4f}")


if __name__ == "__main__":
    main()
