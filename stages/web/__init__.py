"""From web crawl to clean text: WARC/WET ingest (warc.py frames records, warc_ingest.py makes
rows of pages)."""

# Importing the stages registers them: the registry imports every ``stages.<package>``.
from stages.web.warc_ingest import WarcIngest

__all__ = ["WarcIngest"]
