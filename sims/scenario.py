"""Scenarios: what a simulation runs, as TOML files or as Python objects for sweeps.

A scenario names the peers (how many masters, requesters and workers, their
stakes, devices and shares), the links between them (latency, bandwidth,
loss), churn, byzantine workers and their strategy, master crashes, the jobs
submitted and when, and how compute is done (real torch or the cost model).
Every setting is checked when the scenario is built; an error names the
setting (`network.latency_ms.low: must be >= 0, got -1`).

`load_scenario(path)` reads a TOML file; `Scenario.from_dict` takes the same
data; `dataclasses.replace` varies one setting for a sweep. The shipped
scenarios live in `sims/scenarios/` (`scenario_path("baseline")`).
"""

from __future__ import annotations

import math
import random
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ravenp2p.roles.faults import FAULT_KINDS
from ravenp2p.training.spec import JobSpec, JobSpecError, load_job_spec

SCENARIOS_DIR = Path(__file__).parent / "scenarios"
JOBS_DIR = Path(__file__).parent / "jobs"
MAX_SCENARIO_BYTES = 1 << 20

DISTRIBUTION_KINDS = ("fixed", "uniform", "lognormal", "choice")
STRATEGIES = (*FAULT_KINDS, "mixed", "colluding", "withholding")
"""Byzantine strategies: the fault kinds of `ravenp2p.roles.faults` (each alone), `mixed`
(a different kind per calculation), `colluding` (the whole group returns the same wrong
result, so its members agree with each other) and `withholding` (takes orders, never answers)."""
COMPUTE_MODES = ("real", "modeled")
CRASH_TARGETS = ("job-master", "random-master")


class ScenarioError(ValueError):
    """A scenario setting is invalid; the message names the setting (`churn.leave_per_hour`)."""

    def __init__(self, setting: str, reason: str) -> None:
        super().__init__(f"{setting}: {reason}")
        self.setting = setting
        self.reason = reason


@dataclass(frozen=True)
class Distribution:
    """A random quantity: `fixed` value, `uniform` [low, high], `lognormal` (median, sigma),
    or a `choice` among `values` with optional `weights`."""

    kind: str = "fixed"
    value: float = 0.0
    low: float = 0.0
    high: float = 0.0
    median: float = 0.0
    sigma: float = 0.0
    values: tuple[float, ...] = ()
    weights: tuple[float, ...] = ()

    def sample(self, rng: random.Random) -> float:
        """One draw."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "uniform":
            return rng.uniform(self.low, self.high)
        if self.kind == "lognormal":
            return self.median * math.exp(self.sigma * rng.gauss(0.0, 1.0))
        return rng.choices(self.values, weights=self.weights or None)[0]

    @property
    def mean(self) -> float:
        """The expected value (for reports and the cost model's defaults)."""
        if self.kind == "fixed":
            return self.value
        if self.kind == "uniform":
            return (self.low + self.high) / 2
        if self.kind == "lognormal":
            return self.median * math.exp(self.sigma**2 / 2)
        weights = self.weights or (1.0,) * len(self.values)
        return sum(v * w for v, w in zip(self.values, weights, strict=True)) / sum(weights)

    def check(self, setting: str, minimum: float = 0.0) -> Distribution:
        """This distribution, or `ScenarioError` when it can draw values below `minimum`."""
        if self.kind not in DISTRIBUTION_KINDS:
            raise ScenarioError(f"{setting}.kind", f"must be one of {', '.join(DISTRIBUTION_KINDS)}"
                                f", got {self.kind!r}")
        numbers = {"fixed": ("value",), "uniform": ("low", "high"),
                   "lognormal": ("median",), "choice": ()}[self.kind]
        for name in numbers:
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= minimum):
                raise ScenarioError(f"{setting}.{name}", f"must be >= {minimum:g}, got {value!r}")
        if self.kind == "uniform" and self.high < self.low:
            raise ScenarioError(f"{setting}.high", f"must be >= low ({self.low:g})")
        if self.kind == "lognormal" and not 0 <= self.sigma <= 5:
            raise ScenarioError(f"{setting}.sigma", f"must be between 0 and 5, got {self.sigma}")
        if self.kind == "choice":
            if not self.values:
                raise ScenarioError(f"{setting}.values", "must list at least one value")
            for value in self.values:
                if not (math.isfinite(value) and value >= minimum):
                    raise ScenarioError(f"{setting}.values",
                                        f"every value must be >= {minimum:g}, got {value!r}")
            if self.weights and (len(self.weights) != len(self.values)
                                 or min(self.weights) < 0 or sum(self.weights) <= 0):
                raise ScenarioError(f"{setting}.weights",
                                    "one non-negative weight per value, not all zero")
        return self

    @classmethod
    def parse(cls, setting: str, data: object) -> Distribution:
        """From TOML: a bare number (fixed) or a table with `kind` and its parameters."""
        if isinstance(data, int | float) and not isinstance(data, bool):
            return cls(value=float(data))
        table = _table(setting, data, ("kind", "value", "low", "high", "median", "sigma",
                                       "values", "weights"))
        kind = table.get("kind", "fixed")
        if not isinstance(kind, str):
            raise ScenarioError(f"{setting}.kind", f"must be a string, got {kind!r}")
        floats = {name: _number(f"{setting}.{name}", table[name])
                  for name in ("value", "low", "high", "median", "sigma") if name in table}
        lists = {name: tuple(_number(f"{setting}.{name}", v)
                             for v in _list(f"{setting}.{name}", table[name]))
                 for name in ("values", "weights") if name in table}
        return cls(kind=kind, **floats, **lists)  # type: ignore[arg-type]


def fixed(value: float) -> Distribution:
    """A distribution that always draws `value`."""
    return Distribution(value=float(value))


@dataclass(frozen=True)
class Device:
    """A class of contributor hardware: its share of the workers and its speed.

    `speed` is relative to the reference device the jobs' `reference_seconds`
    were measured on (1.0: as fast; a GPU may be 20).
    """

    name: str
    weight: float = 1.0
    speed: float = 1.0


LOOPBACK_LATENCY_MS = 0.9
"""Default access-link latency: half the one-way time of a libp2p request on loopback
(benchmarks/net.py: request/response median 3.59 ms round trip), as two links add up."""
LOOPBACK_BANDWIDTH_MBPS = 11_256.0
"""Default access bandwidth: the bulk stream's 1,407 MB/s on loopback (benchmarks/net.py)."""


@dataclass(frozen=True)
class NetworkSettings:
    """Peers and links. Latency and bandwidth are each peer's access link; a message
    between two peers pays both ends' latency and the slower end's bandwidth. The
    defaults are libp2p on loopback as measured by benchmarks/net.py, so that a
    simulation without link settings matches a devnet on one machine."""

    masters: int = 3
    requesters: int = 1
    workers: int = 8
    degree: int = 4
    """Random connections each peer opens besides its bootstrap peer."""
    master_links: int = 0
    """Masters each worker stays connected to (a master assigns to the workers it is
    connected to), drawn at random; 0: all of them."""
    latency_ms: Distribution = field(default_factory=lambda: fixed(LOOPBACK_LATENCY_MS))
    """One-way latency of each peer's access link, in milliseconds."""
    bandwidth_mbps: Distribution = field(
        default_factory=lambda: fixed(LOOPBACK_BANDWIDTH_MBPS))
    """Each peer's access bandwidth, in megabits per second."""
    loss: Distribution = field(default_factory=lambda: fixed(0.0))
    """Probability that one gossip hop through the peer's access link is lost."""
    dht_k: int = 8
    announce_interval_s: float = 20.0
    topic_sync_interval_s: float = 1.0
    topic_sync_max_interval_s: float | None = None
    """Quiet topics resync less and less often, down to this (None: always the interval)."""
    topic_sync_fanout: int = 2
    """Neighbours asked at each resync of a topic."""
    worker_directory: bool = True
    """Whether workers keep a directory of every peer (read the peers topic). Masters and
    requesters always do; big networks turn it off for workers."""
    hop_resolution_ms: float = 1.0
    """Gossip hops arrive at the next multiple of this many milliseconds (0: exactly when
    due). Hops due within one step are delivered together, which is far cheaper to
    simulate than one wake-up each; keep it well below the links' latency."""


@dataclass(frozen=True)
class ComputeSettings:
    """How calculations are computed and how long they take in virtual time.

    `real`: every worker runs torch on its inputs (tens of peers). `modeled`:
    one honest result per distinct calculation is computed with torch and
    shared; each worker's copy differs in its low bits the way results from
    different CPUs do (see docs/simulation.md). Either way a calculation takes
    the job's `reference_seconds` / the device's speed, times a lognormal
    `jitter`, in virtual time.
    """

    mode: str = "real"
    devices: tuple[Device, ...] = (Device("cpu"),)
    share: Distribution = field(default_factory=lambda: fixed(50.0))
    """Percent of its device each worker lends (its throttle: 2 calculations/s per percent)."""
    jitter: float = 0.1
    honest_noise: float = 1e-7
    """Relative L2 difference between two honest results of one calculation (modeled mode)."""


@dataclass(frozen=True)
class StakeSettings:
    """RAVEN staked by each worker and each master (drawn per peer)."""

    worker: Distribution = field(default_factory=lambda: fixed(100.0))
    master: Distribution = field(default_factory=lambda: fixed(1000.0))


@dataclass(frozen=True)
class ChurnSettings:
    """Workers leaving and joining, as Poisson processes (fractions of the workers per hour)."""

    leave_per_hour: float = 0.0
    join_per_hour: float = 0.0
    crash_fraction: float = 0.5
    """Share of departures that are crashes (no goodbye) rather than graceful stops."""
    start_s: float = 0.0
    """Churn starts this long after the start (once the first jobs are running)."""


@dataclass(frozen=True)
class ByzantineSettings:
    """Workers that return wrong results (signed with their own keys)."""

    fraction: float = 0.0
    strategy: str = "mixed"


@dataclass(frozen=True)
class MasterCrash:
    """A master killed without a word at `at_s`: a job's current master or any master."""

    at_s: float
    target: str = "job-master"


@dataclass(frozen=True)
class JobEntry:
    """`count` jobs of `spec`, submitted `every_s` apart from `submit_at_s`."""

    spec: JobSpec
    reference_seconds: float = 1.0
    """Virtual seconds one calculation takes on a device of speed 1."""
    submit_at_s: float = 0.0
    count: int = 1
    every_s: float = 0.0


@dataclass(frozen=True)
class Scenario:
    """Everything a simulation needs; see the module docstring."""

    name: str
    jobs: tuple[JobEntry, ...]
    duration_s: float = 600.0
    """Virtual seconds simulated (jobs still running then are reported as they are)."""
    seed: int = 0
    description: str = ""
    sample_every_s: float = 10.0
    network: NetworkSettings = field(default_factory=NetworkSettings)
    compute: ComputeSettings = field(default_factory=ComputeSettings)
    stake: StakeSettings = field(default_factory=StakeSettings)
    churn: ChurnSettings = field(default_factory=ChurnSettings)
    byzantine: ByzantineSettings = field(default_factory=ByzantineSettings)
    master_crashes: tuple[MasterCrash, ...] = ()
    result_deadline_s: float = 30.0
    """How long a master waits for a worker's result before staffing another worker."""
    master_timeout_s: int = 10
    """The escrow's master timeout: silence after which the next-ranked master takes a job."""
    master_heartbeat_s: float = 1.0
    """How often a master says on a job's topic that it is alive (failover watches it)."""

    def __post_init__(self) -> None:
        check = _Checker()
        check.text("name", self.name, 64)
        if not self.jobs:
            raise ScenarioError("jobs", "at least one job is needed")
        check.positive("duration_s", self.duration_s, maximum=30 * 24 * 3600)
        check.positive("sample_every_s", self.sample_every_s, maximum=self.duration_s)
        net = self.network
        check.count("network.masters", net.masters, 1, 64)
        check.count("network.requesters", net.requesters, 1, 64)
        check.count("network.workers", net.workers, 1, 100_000)
        check.count("network.degree", net.degree, 1, 64)
        check.count("network.master_links", net.master_links, 0, 64)
        check.count("network.dht_k", net.dht_k, 1, 64)
        check.count("network.topic_sync_fanout", net.topic_sync_fanout, 1, 16)
        net.latency_ms.check("network.latency_ms")
        net.bandwidth_mbps.check("network.bandwidth_mbps", minimum=0.001)
        net.loss.check("network.loss")
        if net.loss.kind != "lognormal" and _largest(net.loss) > 1:
            raise ScenarioError("network.loss", "a probability cannot exceed 1")
        check.fraction("network.hop_resolution_ms", net.hop_resolution_ms, maximum=1000.0)
        check.positive("network.announce_interval_s", net.announce_interval_s)
        check.positive("network.topic_sync_interval_s", net.topic_sync_interval_s)
        if net.topic_sync_max_interval_s is not None and not (
            net.topic_sync_interval_s <= net.topic_sync_max_interval_s <= 24 * 3600
        ):
            raise ScenarioError("network.topic_sync_max_interval_s",
                                "must be between topic_sync_interval_s and a day")
        compute = self.compute
        if compute.mode not in COMPUTE_MODES:
            raise ScenarioError("compute.mode", f"must be one of {', '.join(COMPUTE_MODES)}, "
                                f"got {compute.mode!r}")
        if not compute.devices:
            raise ScenarioError("compute.devices", "at least one device class is needed")
        for i, device in enumerate(compute.devices):
            check.text(f"compute.devices[{i}].name", device.name, 32)
            check.positive(f"compute.devices[{i}].speed", device.speed)
            check.positive(f"compute.devices[{i}].weight", device.weight)
        compute.share.check("compute.share", minimum=1)
        if _largest(compute.share) > 100:
            raise ScenarioError("compute.share", "a share is a percentage: at most 100")
        check.fraction("compute.jitter", compute.jitter, maximum=2.0)
        check.fraction("compute.honest_noise", compute.honest_noise, maximum=1e-3)
        self.stake.worker.check("stake.worker")
        self.stake.master.check("stake.master", minimum=100)
        churn = self.churn
        check.fraction("churn.leave_per_hour", churn.leave_per_hour, maximum=60.0)
        check.fraction("churn.join_per_hour", churn.join_per_hour, maximum=60.0)
        check.fraction("churn.crash_fraction", churn.crash_fraction)
        check.fraction("churn.start_s", churn.start_s, maximum=math.inf)
        byz = self.byzantine
        check.fraction("byzantine.fraction", byz.fraction, maximum=0.95)
        if byz.strategy not in STRATEGIES:
            raise ScenarioError("byzantine.strategy",
                                f"must be one of {', '.join(STRATEGIES)}, got {byz.strategy!r}")
        for i, crash in enumerate(self.master_crashes):
            check.fraction(f"master_crashes[{i}].at_s", crash.at_s, maximum=math.inf)
            if crash.target not in CRASH_TARGETS:
                raise ScenarioError(f"master_crashes[{i}].target",
                                    f"must be one of {', '.join(CRASH_TARGETS)}")
        if len(self.master_crashes) >= net.masters:
            raise ScenarioError("master_crashes", f"{len(self.master_crashes)} crashes would "
                                f"leave none of the {net.masters} masters")
        for i, job in enumerate(self.jobs):
            check.positive(f"jobs[{i}].reference_seconds", job.reference_seconds)
            check.fraction(f"jobs[{i}].submit_at_s", job.submit_at_s, maximum=math.inf)
            check.count(f"jobs[{i}].count", job.count, 1, 10_000)
            check.fraction(f"jobs[{i}].every_s", job.every_s, maximum=math.inf)
            if job.spec.redundancy > net.workers:
                raise ScenarioError(f"jobs[{i}].spec.redundancy", f"R = {job.spec.redundancy} "
                                    f"needs at least as many workers ({net.workers})")
        check.positive("result_deadline_s", self.result_deadline_s, maximum=3600)
        check.count("master_timeout_s", self.master_timeout_s, 5, 3600)
        check.positive("master_heartbeat_s", self.master_heartbeat_s,
                       maximum=self.master_timeout_s / 2)

    @property
    def peers(self) -> int:
        """Peers at the start: masters, requesters and workers."""
        return self.network.masters + self.network.requesters + self.network.workers

    def with_seed(self, seed: int) -> Scenario:
        """The same scenario with another seed."""
        return replace(self, seed=seed)

    @classmethod
    def from_dict(cls, data: Mapping[str, object], base_dir: Path | None = None) -> Scenario:
        """A scenario from TOML data; job spec paths resolve against `base_dir`, then sims/jobs."""
        top = _table("scenario", data, ("name", "description", "duration_s", "seed",
                                        "sample_every_s", "network", "compute", "stake",
                                        "churn", "byzantine", "master_crashes", "jobs",
                                        "result_deadline_s", "master_timeout_s",
                                        "master_heartbeat_s"))
        name = top.get("name")
        if not isinstance(name, str):
            raise ScenarioError("name", "a scenario needs a name (a string)")
        kwargs: dict[str, Any] = {"name": name}
        if "description" in top:
            kwargs["description"] = _string("description", top["description"])
        for key in ("duration_s", "sample_every_s", "result_deadline_s", "master_heartbeat_s"):
            if key in top:
                kwargs[key] = _number(key, top[key])
        for key in ("seed", "master_timeout_s"):
            if key in top:
                kwargs[key] = _integer(key, top[key])
        if "network" in top:
            kwargs["network"] = _parse_network(top["network"])
        if "compute" in top:
            kwargs["compute"] = _parse_compute(top["compute"])
        if "stake" in top:
            table = _table("stake", top["stake"], ("worker", "master"))
            kwargs["stake"] = StakeSettings(**{
                k: Distribution.parse(f"stake.{k}", v) for k, v in table.items()})
        if "churn" in top:
            table = _table("churn", top["churn"], ("leave_per_hour", "join_per_hour",
                                                   "crash_fraction", "start_s"))
            kwargs["churn"] = ChurnSettings(**{
                k: _number(f"churn.{k}", v) for k, v in table.items()})
        if "byzantine" in top:
            table = _table("byzantine", top["byzantine"], ("fraction", "strategy"))
            kwargs["byzantine"] = ByzantineSettings(
                fraction=_number("byzantine.fraction", table.get("fraction", 0.0)),
                strategy=_string("byzantine.strategy", table.get("strategy", "mixed")),
            )
        if "master_crashes" in top:
            crashes = []
            for i, item in enumerate(_list("master_crashes", top["master_crashes"])):
                table = _table(f"master_crashes[{i}]", item, ("at_s", "target"))
                crashes.append(MasterCrash(
                    at_s=_number(f"master_crashes[{i}].at_s", _required(table, "at_s",
                                                                         f"master_crashes[{i}]")),
                    target=_string(f"master_crashes[{i}].target",
                                   table.get("target", "job-master")),
                ))
            kwargs["master_crashes"] = tuple(crashes)
        jobs = [_parse_job(i, item, base_dir)
                for i, item in enumerate(_list("jobs", top.get("jobs", [])))]
        return cls(jobs=tuple(jobs), **kwargs)


def load_scenario(path: str | Path) -> Scenario:
    """A scenario from a TOML file, or from a shipped one by name (`baseline`)."""
    path = Path(path)
    if not path.exists() and path.suffix == "" and len(path.parts) == 1:
        path = scenario_path(str(path))
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ScenarioError("path", f"{path}: no such file (shipped scenarios: "
                            f"{', '.join(shipped_scenarios())})") from None
    except OSError as exc:
        raise ScenarioError("path", f"{path}: cannot be read ({exc.strerror})") from None
    if len(raw) > MAX_SCENARIO_BYTES:
        raise ScenarioError("path", f"{path}: larger than {MAX_SCENARIO_BYTES} bytes")
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError("toml", f"{path} is not valid TOML: {exc}") from None
    return Scenario.from_dict(data, base_dir=path.parent)


def with_redundancy(jobs: Sequence[JobEntry], redundancy: int) -> tuple[JobEntry, ...]:
    """The same jobs with redundancy R = `redundancy` (for sweeps over R), each budget
    raised where the worst case of the larger R needs it."""
    changed = []
    for entry in jobs:
        spec = replace(entry.spec, redundancy=redundancy)
        spec = replace(spec, budget=max(spec.budget, spec.max_cost()))
        changed.append(replace(entry, spec=spec))
    return tuple(changed)


def scenario_path(name: str) -> Path:
    """The file of a shipped scenario."""
    return SCENARIOS_DIR / f"{name}.toml"


def shipped_scenarios() -> list[str]:
    """Names of the scenarios in `sims/scenarios/`."""
    return sorted(p.stem for p in SCENARIOS_DIR.glob("*.toml"))


# --- parsing helpers ------------------------------------------------------------------
class _Checker:
    def text(self, setting: str, value: str, max_len: int) -> None:
        if not isinstance(value, str) or not value or len(value) > max_len:
            raise ScenarioError(setting, f"must be a non-empty string of at most {max_len} "
                                f"characters, got {value!r}")

    def positive(self, setting: str, value: float, maximum: float = math.inf) -> None:
        if not (math.isfinite(value) and 0 < value <= maximum):
            raise ScenarioError(setting, f"must be > 0 and <= {maximum:g}, got {value!r}")

    def fraction(self, setting: str, value: float, maximum: float = 1.0) -> None:
        if not (math.isfinite(value) and 0 <= value <= maximum):
            bounds = "a number >= 0" if maximum == math.inf else f"between 0 and {maximum:g}"
            raise ScenarioError(setting, f"must be {bounds}, got {value!r}")

    def count(self, setting: str, value: int, low: int, high: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ScenarioError(setting, f"must be an integer between {low} and {high}, "
                                f"got {value!r}")


def _largest(dist: Distribution) -> float:
    if dist.kind == "fixed":
        return dist.value
    if dist.kind == "uniform":
        return dist.high
    if dist.kind == "choice":
        return max(dist.values)
    return math.inf


def _table(setting: str, data: object, allowed: Sequence[str]) -> Mapping[str, object]:
    if not isinstance(data, Mapping):
        raise ScenarioError(setting, f"must be a table, got {type(data).__name__}")
    for key in data:
        if key not in allowed:
            near = [a for a in allowed if a.split("_")[0] == str(key).split("_")[0]]
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ScenarioError(f"{setting}.{key}" if setting != "scenario" else str(key),
                                f"unknown setting{hint}; known: {', '.join(allowed)}")
    return data


def _required(table: Mapping[str, object], key: str, setting: str) -> object:
    if key not in table:
        raise ScenarioError(f"{setting}.{key}", "is required")
    return table[key]


def _number(setting: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ScenarioError(setting, f"must be a number, got {value!r}")
    return float(value)


def _integer(setting: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ScenarioError(setting, f"must be an integer, got {value!r}")
    return value


def _boolean(setting: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ScenarioError(setting, f"must be true or false, got {value!r}")
    return value


def _string(setting: str, value: object) -> str:
    if not isinstance(value, str):
        raise ScenarioError(setting, f"must be a string, got {value!r}")
    return value


def _list(setting: str, value: object) -> list[object]:
    if not isinstance(value, list):
        raise ScenarioError(setting, f"must be a list, got {type(value).__name__}")
    return value


def _parse_network(data: object) -> NetworkSettings:
    table = _table("network", data, ("masters", "requesters", "workers", "degree",
                                     "master_links", "latency_ms",
                                     "bandwidth_mbps", "loss", "dht_k", "announce_interval_s",
                                     "topic_sync_interval_s", "topic_sync_max_interval_s",
                                     "topic_sync_fanout", "worker_directory",
                                     "hop_resolution_ms"))
    kwargs: dict[str, Any] = {}
    for key in ("masters", "requesters", "workers", "degree", "master_links", "dht_k",
                "topic_sync_fanout"):
        if key in table:
            kwargs[key] = _integer(f"network.{key}", table[key])
    for key in ("latency_ms", "bandwidth_mbps", "loss"):
        if key in table:
            kwargs[key] = Distribution.parse(f"network.{key}", table[key])
    for key in ("announce_interval_s", "topic_sync_interval_s", "topic_sync_max_interval_s",
                "hop_resolution_ms"):
        if key in table:
            kwargs[key] = _number(f"network.{key}", table[key])
    if "worker_directory" in table:
        kwargs["worker_directory"] = _boolean("network.worker_directory",
                                              table["worker_directory"])
    return NetworkSettings(**kwargs)


def _parse_compute(data: object) -> ComputeSettings:
    table = _table("compute", data, ("mode", "devices", "share", "jitter", "honest_noise"))
    kwargs: dict[str, Any] = {}
    if "mode" in table:
        kwargs["mode"] = _string("compute.mode", table["mode"])
    if "share" in table:
        kwargs["share"] = Distribution.parse("compute.share", table["share"])
    for key in ("jitter", "honest_noise"):
        if key in table:
            kwargs[key] = _number(f"compute.{key}", table[key])
    if "devices" in table:
        devices = []
        for i, item in enumerate(_list("compute.devices", table["devices"])):
            setting = f"compute.devices[{i}]"
            row = _table(setting, item, ("name", "weight", "speed"))
            devices.append(Device(
                name=_string(f"{setting}.name", _required(row, "name", setting)),
                weight=_number(f"{setting}.weight", row.get("weight", 1.0)),
                speed=_number(f"{setting}.speed", row.get("speed", 1.0)),
            ))
        kwargs["devices"] = tuple(devices)
    return ComputeSettings(**kwargs)


def _parse_job(index: int, data: object, base_dir: Path | None) -> JobEntry:
    setting = f"jobs[{index}]"
    table = _table(setting, data, ("spec", "reference_seconds", "submit_at_s", "count",
                                   "every_s", "redundancy", "price", "budget"))
    name = _string(f"{setting}.spec", _required(table, "spec", setting))
    candidates = [Path(name)] if Path(name).is_absolute() else [
        *([base_dir / name] if base_dir is not None else []), JOBS_DIR / name,
        JOBS_DIR / f"{name}.toml"]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        raise ScenarioError(f"{setting}.spec", f"{name!r}: no such job spec (looked in "
                            f"{', '.join(str(p.parent) for p in candidates)})")
    try:
        spec = load_job_spec(path)
        data = spec.to_dict()
        if "redundancy" in table:
            data["redundancy"] = _integer(f"{setting}.redundancy", table["redundancy"])
        payment = dict(data["payment"])
        if "price" in table:  # RAVEN per accepted calculation per worker, as in a spec
            payment["price_per_calculation"] = table["price"]
        if "budget" in table:
            payment["budget"] = table["budget"]
        data["payment"] = payment
        spec = JobSpec.from_dict(data)
    except JobSpecError as exc:
        raise ScenarioError(f"{setting}.spec.{exc.field}", exc.reason) from None
    return JobEntry(
        spec=spec,
        reference_seconds=_number(f"{setting}.reference_seconds",
                                  table.get("reference_seconds", 1.0)),
        submit_at_s=_number(f"{setting}.submit_at_s", table.get("submit_at_s", 0.0)),
        count=_integer(f"{setting}.count", table.get("count", 1)),
        every_s=_number(f"{setting}.every_s", table.get("every_s", 0.0)),
    )
