"""Scenarios: the shipped ones load, every setting is checked, errors name the setting."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import sims
from sims.scenario import Distribution, Scenario, ScenarioError

REQUIRED = ("baseline", "churn", "byzantine-30", "master-crash", "wan-100", "scale-10k")


def test_every_required_scenario_is_shipped_and_valid() -> None:
    assert set(REQUIRED) <= set(sims.shipped_scenarios())
    for name in sims.shipped_scenarios():
        scenario = sims.load_scenario(name)
        assert scenario.name == name
        assert scenario.jobs and scenario.description
    big = sims.load_scenario("scale-10k")
    assert big.peers == 10_000 and big.compute.mode == "modeled"
    assert big.duration_s == 3600
    assert sims.load_scenario("byzantine-30").byzantine.fraction == pytest.approx(0.3)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "scenario.toml"
    path.write_text(text)
    return path


MINIMAL = 'name = "x"\n[[jobs]]\nspec = "digits-sim"\n'


@pytest.mark.parametrize(("extra", "setting"), [
    ("duration_s = -5\n", "duration_s"),
    ("[network]\nworkers = 0\n", "network.workers"),
    ("[network]\nlatency_ms = { kind = \"uniform\", low = 5, high = 1 }\n",
     "network.latency_ms.high"),
    ("[network]\nloss = 1.5\n", "network.loss"),
    ("[network]\nhop_resolution_ms = -1\n", "network.hop_resolution_ms"),
    ("[network]\nhop_resolution_ms = \"fine\"\n", "network.hop_resolution_ms"),
    ("[network]\nlatency_ms = { kind = \"gauss\" }\n", "network.latency_ms.kind"),
    ("[network]\nworkerz = 3\n", "network.workerz"),
    ("[compute]\nmode = \"quantum\"\n", "compute.mode"),
    ("[compute]\nshare = 150\n", "compute.share"),
    ("[byzantine]\nstrategy = \"bribery\"\n", "byzantine.strategy"),
    ("[byzantine]\nfraction = 1.5\n", "byzantine.fraction"),
    ("[churn]\nleave_per_hour = -1\n", "churn.leave_per_hour"),
    ("[[master_crashes]]\nat_s = 10\n[[master_crashes]]\nat_s = 20\n[[master_crashes]]\n"
     "at_s = 30\n", "master_crashes"),
    ("master_heartbeat_s = 20\n", "master_heartbeat_s"),
])
def test_a_bad_setting_is_refused_by_name(tmp_path: Path, extra: str, setting: str) -> None:
    text = MINIMAL.replace('name = "x"\n', f'name = "x"\n{extra}') if not extra.startswith(
        "[") else MINIMAL + extra
    with pytest.raises(ScenarioError) as caught:
        sims.load_scenario(write(tmp_path, text))
    assert caught.value.setting == setting, str(caught.value)


def test_file_level_problems_are_named(tmp_path: Path) -> None:
    with pytest.raises(ScenarioError, match="no such file"):
        sims.load_scenario(tmp_path / "missing.toml")
    with pytest.raises(ScenarioError, match="not valid TOML"):
        sims.load_scenario(write(tmp_path, "name = "))
    with pytest.raises(ScenarioError, match="at least one job"):
        sims.load_scenario(write(tmp_path, 'name = "x"\n'))
    with pytest.raises(ScenarioError, match=r"jobs\[0\].spec"):
        sims.load_scenario(write(tmp_path, 'name = "x"\n[[jobs]]\nspec = "nope"\n'))
    text = MINIMAL.replace('spec = "digits-sim"', 'spec = "digits-sim"\nredundancy = 9')
    with pytest.raises(ScenarioError, match=r"jobs\[0\].spec.payment.budget: .* does not cover"):
        sims.load_scenario(write(tmp_path, text))


def test_job_overrides_and_sweep_helpers(tmp_path: Path) -> None:
    text = MINIMAL.replace('spec = "digits-sim"',
                           'spec = "digits-sim"\nredundancy = 3\ncount = 3\nevery_s = 60')
    text = text.replace('name = "x"\n', 'name = "x"\n[network]\nworkers = 6\n')
    scenario = sims.load_scenario(write(tmp_path, text))
    entry = scenario.jobs[0]
    assert (entry.spec.redundancy, entry.count, entry.every_s) == (3, 3, 60.0)
    priced = text.replace("count = 3", 'count = 3\nprice = "0.002"\nbudget = "5"')
    spec = sims.load_scenario(write(tmp_path, priced)).jobs[0].spec
    assert (spec.price_per_calculation, spec.budget) == (2 * 10**15, 5 * 10**18)
    too_dear = text.replace("count = 3", 'count = 3\nprice = "0.05"')
    with pytest.raises(ScenarioError, match=r"jobs\[0\].spec.payment.budget"):
        sims.load_scenario(write(tmp_path, too_dear))
    swept = dataclasses.replace(scenario, jobs=sims.with_redundancy(scenario.jobs, 6))
    assert swept.jobs[0].spec.redundancy == 6
    assert swept.jobs[0].spec.budget >= swept.jobs[0].spec.max_cost()
    assert scenario.with_seed(9).seed == 9
    assert scenario.network.hop_resolution_ms == 1.0
    exact = text.replace("workers = 6\n", "workers = 6\nhop_resolution_ms = 0\n")
    assert sims.load_scenario(write(tmp_path, exact)).network.hop_resolution_ms == 0.0


distributions = st.one_of(
    st.builds(Distribution, kind=st.just("fixed"), value=st.floats(0, 1e3)),
    st.tuples(st.floats(0, 1e3), st.floats(0, 1e3)).map(
        lambda lh: Distribution(kind="uniform", low=min(lh), high=max(lh))),
    st.builds(Distribution, kind=st.just("lognormal"), median=st.floats(0.001, 1e3),
              sigma=st.floats(0, 2)),
    st.lists(st.floats(0, 1e3), min_size=1, max_size=5).map(
        lambda values: Distribution(kind="choice", values=tuple(values))),
)


@given(distributions, st.integers(0, 2**32))
def test_draws_stay_within_what_the_distribution_allows(dist: Distribution, seed: int) -> None:
    dist.check("d")
    rng = random.Random(seed)
    for _ in range(20):
        value = dist.sample(rng)
        assert value >= 0
        if dist.kind == "uniform":
            assert dist.low <= value <= dist.high
        if dist.kind == "choice":
            assert value in dist.values


def test_scenarios_can_be_built_in_python() -> None:
    spec = sims.load_scenario("baseline").jobs[0].spec
    scenario = Scenario(name="py", jobs=(sims.JobEntry(spec, reference_seconds=0.5),),
                        network=sims.NetworkSettings(workers=4, masters=1))
    assert scenario.peers == 6
    with pytest.raises(ScenarioError, match="jobs"):
        Scenario(name="py", jobs=())
