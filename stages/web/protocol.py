"""The pipe protocol between ``sandbox.ExtractorProcess`` and its worker process
(``extract_worker``), and the reasons a page can fail with. Described in ``sandbox.py``."""

import struct

OK, ERROR, READY = 0, 1, 255
PAGE = struct.Struct("!III")
RESULT = struct.Struct("!BII")
COUNT = struct.Struct("!I")

# Quarantine reasons (stable names).
EXTRACT_TIMEOUT = "extract_timeout"
EXTRACT_CRASHED = "extract_crashed"
EXTRACT_ERROR = "extract_error"
UNDECODABLE_HTML = "undecodable_html"
