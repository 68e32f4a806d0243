"""Simulation harness: the real role code over an in-memory network and a virtual clock.

For researchers: describe a network (peers, links, churn, attackers, jobs) as a
`Scenario` (or a TOML file: `load_scenario`), run it with `run`, and read the
`Result`: a summary, time series sampled in virtual time, per-worker rows.

    import dataclasses, sims
    base = sims.load_scenario("byzantine-30")
    for r in (3, 5):
        result = sims.run(dataclasses.replace(base, jobs=sims.with_redundancy(base.jobs, r)))
        print(r, result.summary["accepted_bad_rate"])

`ravenp2p sim SCENARIO.toml --out DIR` does the same from the command line and
also writes the metrics as CSV and the plots as PNG.
"""

from sims.metrics import Result
from sims.runner import Progress, run
from sims.scenario import (
    ByzantineSettings,
    ChurnSettings,
    ComputeSettings,
    Device,
    Distribution,
    JobEntry,
    MasterCrash,
    NetworkSettings,
    Scenario,
    ScenarioError,
    StakeSettings,
    fixed,
    load_scenario,
    scenario_path,
    shipped_scenarios,
    with_redundancy,
)

__all__ = [
    "ByzantineSettings",
    "ChurnSettings",
    "ComputeSettings",
    "Device",
    "Distribution",
    "JobEntry",
    "MasterCrash",
    "NetworkSettings",
    "Progress",
    "Result",
    "Scenario",
    "ScenarioError",
    "StakeSettings",
    "fixed",
    "load_scenario",
    "run",
    "scenario_path",
    "shipped_scenarios",
    "with_redundancy",
]
