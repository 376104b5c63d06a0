"""From web crawl to clean text: WARC/WET ingest (warc.py frames records, warc_ingest.py makes
rows of pages), HTML extraction (extractors.py, run in a killable worker by sandbox.py, as the
extract_html stage) and URL filtering (url_filter.py)."""

# Importing the stages registers them: the registry imports every ``stages.<package>``.
from stages.web.extract_html import ExtractHtml
from stages.web.url_filter import UrlFilter
from stages.web.warc_ingest import WarcIngest

__all__ = ["ExtractHtml", "UrlFilter", "WarcIngest"]
