"""
The log observers ``twistd cc50`` installs.

``--log-format=json`` (``jsonObserver``): twisted.logger events are already
structured (the per-request line carries req_id, peer, outcome, tokens and
latency as fields); this writes each event as one JSON object per line on
stdout, where journald, Docker and log shippers pick it up.

``--log-format=text`` (``textObserver``): the observer twistd would have made
itself, on the same file (stdout, or ``--logfile`` with its rotation).

cc50tw makes them rather than leaving it to twistd so that it knows the
file: the per-request lines are then written there in buffered batches
(``cc50tw.accesslog``) instead of one formatted and flushed event each.
"""

from __future__ import annotations

import signal
import sys
from typing import IO, Any

from twisted.logger import ILogObserver, jsonFileLogObserver, textFileLogObserver
from twisted.python.logfile import LogFile

from cc50tw import accesslog

#: twistd's ``--logfile`` and ``--nodaemon``, recorded by ``twistd cc50``'s
#: options for ``textObserver``, which twistd calls with no arguments.
_twistdLogOptions: tuple[str | None, bool] = (None, True)


def useTwistdLogOptions(logfile: str | None, nodaemon: bool) -> None:
    global _twistdLogOptions
    _twistdLogOptions = (logfile, nodaemon)


def twistdLogFile(logfile: str | None, nodaemon: bool) -> IO[Any]:
    """
    The file twistd logs to with these options, chosen as its Unix logger
    does (``UnixAppLogger._getLogObserver``): stdout in the foreground
    unless ``--logfile`` names a file; else a ``LogFile`` (``twistd.log`` by
    default) that rotates at 1 MB and on SIGUSR1.
    """
    if logfile == "-":
        if not nodaemon:
            sys.exit("Daemons cannot log to stdout, exiting!")
        return sys.stdout
    if nodaemon and not logfile:
        return sys.stdout
    output = LogFile.fromFullPath(logfile or "twistd.log")
    if not signal.getsignal(signal.SIGUSR1):

        def rotateLog(signalNumber: int, frame: object) -> None:
            from twisted.internet import reactor

            reactor.callFromThread(output.rotate)  # type: ignore[attr-defined]

        signal.signal(signal.SIGUSR1, rotateLog)
    return output


def textObserver() -> ILogObserver:
    """The observer factory for ``--log-format=text`` (twistd's ``--logger``)."""
    output = twistdLogFile(*_twistdLogOptions)
    return accesslog.install(textFileLogObserver(output), output, accesslog.TextLines())


def jsonObserver() -> ILogObserver:
    """The observer factory twistd's ``--logger`` expects."""
    return accesslog.install(
        jsonFileLogObserver(sys.stdout, recordSeparator=""),
        sys.stdout,
        accesslog.jsonLine,
        maxBuffered=accesslog.MAX_BUFFERED_JSON_LINES,
    )
