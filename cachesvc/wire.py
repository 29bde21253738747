"""What cachesvc says on the wire, shared by the API that serves it and the
HTTP origin that talks to another cachesvc (a tier): the files prefix, the
instance header and HTTP dates.
"""

from __future__ import annotations

import datetime
import email.utils
import math

# Where the data API serves files: /files/<path>.
FILES_PREFIX = "/files/"
# Sent with every data response: unique to one run of the process, so a
# client that fronts us (an upper cachesvc tier) notices a restart that
# lost its unsynced writes.
INSTANCE_HEADER = "X-Cachesvc-Instance"


def parse_http_date(value: str) -> int | None:
    """Seconds since the epoch of an HTTP-date (IMF-fixdate, RFC 850 or asctime form).

    None when the value is not one valid date (a list of dates included);
    a date without a zone is taken as GMT.
    """
    # IMF-fixdate and RFC 850 dates have one comma, asctime dates none.
    if value.count(",") > 1:
        return None
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (ValueError, TypeError, IndexError, OverflowError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=datetime.UTC)
    return math.floor(moment.timestamp())


def format_http_date(timestamp: float) -> str:
    """IMF-fixdate of ``timestamp`` (truncated to whole seconds), for ``Last-Modified``."""
    return email.utils.formatdate(math.floor(timestamp), usegmt=True)
