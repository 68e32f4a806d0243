"""The one error type of the wire layer."""

from __future__ import annotations


class WireError(ValueError):
    """A message was refused. `field` names what was wrong, `reason` says why."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
