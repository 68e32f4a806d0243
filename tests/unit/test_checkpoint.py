"""A checkpoint (or a replica from another master) is checked field by field before use."""

from __future__ import annotations

from typing import Any

import pytest

from ravenp2p.roles.checkpoint import checkpoint_problem

JOB = "ab" * 32


def valid() -> dict[str, Any]:
    return {
        "job": JOB, "round": 3, "weights": "cd" * 32, "optimizer": "ef" * 32,
        "next_calc": 6, "credits": {"16Uiu2HAmA": 4}, "mismatches": {"16Uiu2HAmB": 1},
        "excluded": ["16Uiu2HAmB"], "rejected": 1, "accepted_total": 6,
        "evaluations": [{"round": 3, "accuracy": 0.5}], "finished": False, "record": None,
    }


def test_a_well_formed_checkpoint_is_usable() -> None:
    assert checkpoint_problem(valid(), JOB) == ""


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"job": "00" * 32}, "another job"),
        ({"round": -1}, "round must be a non-negative integer"),
        ({"next_calc": True}, "next_calc must be a non-negative integer"),
        ({"weights": "../etc/passwd"}, "weights must be a blob digest"),
        ({"optimizer": None}, "optimizer must be a blob digest"),
        ({"credits": [["16Uiu2HAmA", 4]]}, "credits must map peer ids"),
        ({"credits": {"16Uiu2HAmA": -4}}, "credits must map peer ids"),
        ({"mismatches": {"16Uiu2HAmB": "1"}}, "mismatches must map peer ids"),
        ({"excluded": "16Uiu2HAmB"}, "excluded must be a list"),
        ({"evaluations": [1]}, "evaluations must be a list of maps"),
        ({"record": "round 2"}, "record must be a round record"),
        ({"finished": 0}, "finished must be a boolean"),
    ],
)
def test_a_malformed_checkpoint_is_refused_with_the_field_named(
    change: dict[str, Any], problem: str
) -> None:
    state = valid() | change
    assert problem in checkpoint_problem(state, JOB)


def test_a_checkpoint_missing_a_field_or_not_a_map_is_refused() -> None:
    state = valid()
    del state["accepted_total"]
    assert "accepted_total" in checkpoint_problem(state, JOB)
    assert checkpoint_problem([1, 2], JOB) == "a checkpoint is a msgpack map"
