"""The simulator against the real thing: the same 5-peer job on a devnet and in virtual time."""

from __future__ import annotations

import dataclasses

from sims.calibration import TOLERANCE, calibrate
from sims.scenario import load_scenario


def test_simulated_rounds_take_as_long_as_real_ones() -> None:
    """1 master, 1 requester, 3 workers; 6 rounds of the simulator's digits job.

    Real py-libp2p and torch on the devnet; in the simulator, real torch, links
    at the benchmarked loopback figures and the devnet's own compute times.
    """
    spec = load_scenario("baseline").jobs[0].spec
    spec = dataclasses.replace(spec, stop=dataclasses.replace(spec.stop, max_rounds=6))
    result = calibrate(spec, workers=3)
    assert result.devnet_rounds == result.sim_rounds == 6
    assert result.compute_s > 0
    low, high = TOLERANCE
    assert low <= result.ratio <= high, result
