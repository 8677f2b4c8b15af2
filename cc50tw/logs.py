"""
Log output for machines: ``twistd cc50 --log-format=json``.

twisted.logger events are already structured (the per-request line carries
req_id, peer, outcome, tokens and latency as fields); this writes each event
as one JSON object per line on stdout, where journald, Docker and log
shippers pick it up.
"""

from __future__ import annotations

import sys

from twisted.logger import ILogObserver, jsonFileLogObserver


def jsonObserver() -> ILogObserver:
    """The observer factory twistd's ``--logger`` expects."""
    return jsonFileLogObserver(sys.stdout, recordSeparator="")
