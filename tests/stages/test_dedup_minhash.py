"""MinHash signatures equal datasketch's; LSH parameters equal datasketch's; bad inputs are safe."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from datasketch import MinHash
from datasketch.lsh import _optimal_param

from stages.assets import news_articles
from stages.dedup.lsh import band_keys, optimal_param
from stages.dedup.minhash import MinHasher, ShingleConfig, reference_shingles, reference_signature, shingle_hashes
from stages.dedup.normalize import NormalizeConfig, hash_strings, reference_hash_string


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [a["text"] for a in news_articles()[:60] if a["text"].strip()]


def test_string_hash_matches_its_definition():
    values = ["", "a", "hello", "wörld ☃", "x" * 300]
    arr = pa.array(values).slice(0)
    assert [int(h) for h in hash_strings(arr)] == [reference_hash_string(v) for v in values]
    assert (hash_strings(arr.slice(2)) == hash_strings(arr)[2:]).all()


@pytest.mark.parametrize(
    "cfg",
    [
        ShingleConfig(),
        ShingleConfig(size=3, normalize=NormalizeConfig(strip_digits=True)),
        ShingleConfig(normalize=NormalizeConfig(strip_punctuation=False, lowercase=False)),  # Unicode whitespace split
        ShingleConfig(kind="char", size=5),
        ShingleConfig(hash="sha1"),
    ],
    ids=["word5", "word3-digits", "word5-keep-punctuation", "char5", "sha1"],
)
def test_signatures_equal_datasketch(texts, cfg):
    """Both paths -- shingle hashes then permutations, and the fused one the stage uses -- equal
    datasketch fed the reference shingles; texts with non-ASCII whitespace and symbols included."""
    docs = texts[:15] + ["no\u00a0break\u3000ideographic\u2028line  \u00bfqué? — ünïcödé ☃ text here", "\u0085tab\tsep\x0bvt\x0cff end"]
    hasher = MinHasher(num_perm=128, seed=1)
    two_step = hasher.signatures(*shingle_hashes(docs, cfg))
    fused, shingles = hasher.signatures_of_texts(pa.array(docs), cfg)
    assert (fused == two_step).all()
    for text, sig, n in zip(docs, fused, shingles):
        assert (sig == reference_signature(text, cfg, 128, 1)).all()
        assert n == len(reference_shingles(text, cfg))


def test_sha1_mode_equals_plain_datasketch_defaults(texts):
    """hash: sha1 is datasketch's default MinHash (affine32, sha1_hash32) on space-joined shingles."""
    cfg = ShingleConfig(hash="sha1")
    sig = MinHasher(64, seed=7).signatures(*shingle_hashes([texts[0]], cfg))[0]
    m = MinHash(num_perm=64, seed=7)
    m.update_batch([" ".join(s).encode() for s in reference_shingles(texts[0], cfg)])
    assert (sig == m.hashvalues).all()


def test_batch_equals_one_by_one_and_huge_documents(texts):
    """Batch composition never changes a signature (chunking, huge documents streamed)."""
    huge = " ".join(texts) * 3  # ~100,000 shingles
    docs = [texts[0], "", huge, "two words", texts[1]]
    hasher = MinHasher()
    batch = hasher.signatures(*shingle_hashes(docs, ShingleConfig()))
    for doc, sig in zip(docs, batch):
        assert (sig == hasher.signatures(*shingle_hashes([doc], ShingleConfig()))[0]).all()
    assert (batch[2] == reference_signature(huge, ShingleConfig())).all()


def test_bad_inputs():
    cfg = ShingleConfig()
    docs = ["", "   ", "!!! ???", "short doc", None]
    hashes, offsets = shingle_hashes(pa.array(docs, pa.string()), cfg)
    assert list(np.diff(offsets)) == [0, 0, 0, 1, 0]  # shorter than one shingle: one shingle of all of it
    sigs = MinHasher().signatures(hashes, offsets)
    fused, shingles = MinHasher().signatures_of_texts(pa.array(docs, pa.string()), cfg)
    assert (fused == sigs).all() and list(shingles) == [0, 0, 0, 1, 0]
    assert (sigs[0] == np.uint32(0xFFFFFFFF)).all()  # empty: datasketch's empty signature
    assert (sigs[3] == reference_signature("short doc", cfg)).all()


@pytest.mark.parametrize("threshold", [0.5, 0.8, 0.9])
def test_lsh_parameters_equal_datasketch(threshold):
    assert optimal_param(threshold, 128) == _optimal_param(threshold, 128, 0.5, 0.5)


def test_band_keys_equal_only_for_equal_bands():
    sigs = np.arange(2 * 12, dtype=np.uint32).reshape(2, 12)
    sigs[1, :4] = sigs[0, :4]
    keys = band_keys(sigs, 3, 4)
    assert keys[0, 0] == keys[1, 0] and (keys[0, 1:] != keys[1, 1:]).all()
    assert len(set(keys[0])) == 3  # the same values in different bands give different keys
