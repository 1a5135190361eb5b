"""A rate limit: requests per window, and its "N/<duration>" form in config and the CLI.

Apart from escrow/ratelimit.py (the counting) so that settings can check the form without
importing the database layer: every CLI command loads settings, `--version` included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from escrowd.config.errors import ValidationFailed

MAX_REQUESTS = 1_000_000_000
MAX_WINDOW_S = 86_400
_UNIT_S = {"s": 1, "m": 60, "h": 3600}
_LIMIT = re.compile(r"^\s*([0-9]{1,10})\s*/\s*([0-9]{0,6})\s*([smh])\s*$")


@dataclass(frozen=True)
class RateLimit:
    requests: int
    window_s: int

    def __str__(self) -> str:
        return f"{self.requests}/{self.window_s}s"


def parse_limit(value: str) -> RateLimit:
    """The RateLimit that "N/<duration>" ("6000/60s", "100/1m", "5000/h") writes;
    ValidationFailed saying what is accepted otherwise."""
    match = _LIMIT.match(value)
    problem = (
        f"invalid rate limit {value!r}: write requests/duration, such as 6000/60s, 100/1m "
        f"or 5000/1h, with 1 to {MAX_REQUESTS} requests and a duration of 1s to 24h"
    )
    if match is None:
        raise ValidationFailed(problem)
    requests = int(match.group(1))
    window_s = int(match.group(2) or "1") * _UNIT_S[match.group(3)]
    if not 1 <= requests <= MAX_REQUESTS or not 1 <= window_s <= MAX_WINDOW_S:
        raise ValidationFailed(problem)
    return RateLimit(requests=requests, window_s=window_s)
