"""The master's checkpoint of a job: what a master (itself after a restart, or
the committee member that takes the job over) needs to resume it.

A msgpack map: the job id, the next round and calculation number, the digests
of the weights and optimizer-state blobs, the credits, mismatches and
exclusions so far, the counters, the requester's evaluations, the last round
record and whether the job finished. The same bytes are the replica a master
hands to the committee members ranked after it, so a replica from another
peer is checked field by field before anything relies on it.
"""

from __future__ import annotations

import re
from typing import Any

CHECKPOINT_FILE = "checkpoint.msgpack"

_DIGEST = re.compile(r"[0-9a-f]{64}")
_COUNTS = ("round", "next_calc", "rejected", "accepted_total")


def checkpoint_problem(state: Any, job_id: str) -> str:
    """What makes `state` unusable as `job_id`'s checkpoint, or "" when it is usable."""
    if not isinstance(state, dict):
        return "a checkpoint is a msgpack map"
    if state.get("job") != job_id:
        return "it is the checkpoint of another job"
    for name in _COUNTS:
        value = state.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} must be a non-negative integer"
    for name in ("weights", "optimizer"):
        if not isinstance(state.get(name), str) or not _DIGEST.fullmatch(state[name]):
            return f"{name} must be a blob digest"
    for name in ("credits", "mismatches"):
        table = state.get(name)
        if not isinstance(table, dict) or not all(
            isinstance(k, str) and isinstance(v, int) and not isinstance(v, bool) and v >= 0
            for k, v in table.items()
        ):
            return f"{name} must map peer ids to non-negative integers"
    excluded = state.get("excluded")
    if not isinstance(excluded, list) or not all(isinstance(p, str) for p in excluded):
        return "excluded must be a list of peer ids"
    evaluations = state.get("evaluations")
    if not isinstance(evaluations, list) or not all(isinstance(e, dict) for e in evaluations):
        return "evaluations must be a list of maps"
    if state.get("record") is not None and not isinstance(state["record"], dict):
        return "record must be a round record or nil"
    if not isinstance(state.get("finished"), bool):
        return "finished must be a boolean"
    return ""
