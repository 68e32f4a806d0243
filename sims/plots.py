"""PNG plots of a simulation `Result`, for researchers reading a run at a glance.

`write_plots(result, out)` draws eight figures from the rows `sims.metrics`
records (the series, the per job series, the workers at the end, the events
and the summary): accuracy, throughput, utilisation, bytes on links,
rejections, payouts, attackers and failovers.

Figures are built with matplotlib's object API on the Agg canvas (no pyplot,
no global state, no display needed) at a fixed size and dpi, and saved
without the software tag, so the same `Result` gives the same bytes. Missing
data (no rows, a single row, no accuracy yet, no workers, no events) never
raises: the figure says what is missing instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

if TYPE_CHECKING:
    from sims.metrics import Result

DPI = 110
SIZE = (9.0, 5.0)
WIDE = (12.0, 5.0)
MB = 1e6
BYTE_KINDS = ("pubsub", "request", "stream", "dht")
HONEST_COLOUR = "tab:blue"
BYZANTINE_COLOUR = "tab:red"
MANY_ATTACKERS = 30
"""Above this many byzantine workers the attackers plot is a scatter, not bars."""

Plot = Callable[["Result"], Figure]


def write_plots(result: Result, out: Path) -> list[Path]:
    """Write every plot of `result` into `out` (created); the paths written.

    A plot that fails for an unforeseen reason is replaced by a figure naming
    the error (and a `RuntimeWarning`), so one bad plot never loses the others.
    """
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, plot in PLOTS:
        try:
            figure = plot(result)
        except Exception as exc:
            warnings.warn(f"plot {name} failed: {exc!r}", RuntimeWarning, stacklevel=2)
            figure = _failed(result, name, exc)
        path = out / name
        _save(figure, path)
        written.append(path)
    return written


# --- the plots --------------------------------------------------------------------------


def plot_accuracy(result: Result) -> Figure:
    """Holdout accuracy per job over virtual time; the loss (second axis) where none is known."""
    figure, ax = _single(result, "holdout accuracy per job")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("holdout accuracy (fraction)")
    jobs = _jobs(result.job_series)
    if not jobs:
        _note(ax, "no job samples recorded")
        return figure
    loss_ax: Axes | None = None
    silent = []
    for index, (label, rows) in enumerate(jobs.items()):
        colour = f"C{index % 10}"
        accuracy = _points(rows, "t", "accuracy")
        loss = _points(rows, "t", "loss")
        if accuracy:
            _line(ax, accuracy, label=label, colour=colour)
        elif loss:
            if loss_ax is None:
                loss_ax = ax.twinx()
                loss_ax.set_ylabel("training loss (no accuracy known), dashed")
            _line(loss_ax, loss, label=f"{label} (loss)", colour=colour, style="--")
        else:
            silent.append(label)
        done = next((_num(r.get("t")) for r in rows if r.get("state") == "done"), None)
        if done is not None and accuracy:
            ax.axvline(done, color=colour, alpha=0.3, linewidth=1)
    _crash_lines(ax, result)
    if silent and len(silent) < len(jobs):
        ax.text(0.01, 0.01, "no accuracy or loss yet: " + ", ".join(silent),
                transform=ax.transAxes, fontsize=8, va="bottom")
    if not any(_points(rows, "t", "accuracy") for rows in jobs.values()):
        ax.set_yticks([])
        if loss_ax is None:
            _note(ax, "no accuracy or loss known for any job")
    else:
        ax.set_ylim(0.0, 1.02)
    _legend(ax, loss_ax)
    return figure


def plot_throughput(result: Result) -> Figure:
    """Verified (accepted) calculations per second over virtual time, with the run's mean."""
    figure, ax = _single(result, "verified calculations per second")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("accepted calculations / s")
    points = _points(result.series, "t", "verified_per_s")
    if not points:
        _note(ax, "no series samples recorded")
        return figure
    _line(ax, points, label="per sample interval", colour="tab:green")
    _crash_lines(ax, result)
    mean = _num(result.summary.get("verified_per_s"))
    if mean is not None:
        ax.axhline(mean, color="grey", linestyle="--", linewidth=1,
                   label=f"run mean {mean:.3g} / s")
    ax.set_ylim(bottom=0.0)
    _legend(ax)
    return figure


def plot_utilisation(result: Result) -> Figure:
    """Worker utilisation (busy / live) over virtual time, live workers on a second axis."""
    mean = _num(result.summary.get("utilisation_mean"))
    what = "worker utilisation" + ("" if mean is None else f" (mean {mean:.2f})")
    figure, ax = _single(result, what)
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("utilisation (busy / live workers)")
    utilisation = _points(result.series, "t", "utilisation")
    live = _points(result.series, "t", "live_workers")
    if not utilisation and not live:
        _note(ax, "no series samples recorded")
        return figure
    _line(ax, utilisation, label="utilisation", colour="tab:blue")
    _crash_lines(ax, result)
    top = max([1.0, *(v for _, v in utilisation)])
    ax.set_ylim(0.0, top * 1.05)
    live_ax = ax.twinx()
    live_ax.set_ylabel("live workers (count)")
    if live:
        _line(live_ax, live, label="live workers", colour="tab:orange", step=True)
        live_ax.set_ylim(0.0, max(1.0, max(v for _, v in live)) * 1.1)
    live_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    _legend(ax, live_ax)
    return figure


def plot_bytes(result: Result) -> Figure:
    """Cumulative bytes sent on links over virtual time, stacked by kind, in MB."""
    figure, ax = _single(result, "cumulative bytes on links by kind")
    ax.set_xlabel("virtual time (s)")
    ax.set_ylabel("cumulative bytes sent (MB, 10^6 bytes)")
    rows = [r for r in result.series if _num(r.get("t")) is not None]
    if not rows:
        _note(ax, "no series samples recorded")
        return figure
    times = [_num(r.get("t")) or 0.0 for r in rows]
    stacks = [[(_num(r.get(f"bytes_{kind}")) or 0.0) / MB for r in rows] for kind in BYTE_KINDS]
    labels = [f"{kind} ({values[-1]:.3g} MB)" for kind, values in zip(BYTE_KINDS, stacks,
                                                                        strict=True)]
    if len(rows) == 1:
        bottom = 0.0
        for index, (label, values) in enumerate(zip(labels, stacks, strict=True)):
            ax.bar(times, values, bottom=bottom, width=1.0, label=label, color=f"C{index}")
            bottom += values[0]
        ax.text(0.01, 0.97, "one sample only", transform=ax.transAxes, va="top", fontsize=8)
    else:
        ax.stackplot(times, *stacks, labels=labels, alpha=0.85)
    ax.set_ylim(bottom=0.0)
    _legend(ax, location="upper left", reverse=True)
    return figure


def plot_rejections(result: Result) -> Figure:
    """Rejected and accepted bad results over time, and how fast byzantine workers are excluded."""
    figure, (left, right) = _double(result, "rejections and detection")
    left.set_title("cumulative results", fontsize=10)
    left.set_xlabel("virtual time (s)")
    left.set_ylabel("results (count)")
    rejected = _points(result.series, "t", "rejected")
    bad = _points(result.series, "t", "accepted_bad")
    if rejected or bad:
        _line(left, rejected, label="rejected", colour="tab:orange", step=True)
        _line(left, bad, label="accepted bad", colour=BYZANTINE_COLOUR, step=True)
        left.set_ylim(bottom=0.0)
        left.yaxis.set_major_locator(MaxNLocator(integer=True))
        _legend(left)
    else:
        _note(left, "no series samples recorded")

    right.set_xlabel("detection delay: excluded_at - first_bad_at (s)")
    right.set_ylabel("byzantine workers (count)")
    attackers = [w for w in result.workers if _truthy(w.get("byzantine"))]
    delays = [d for d in (_delay(w) for w in attackers) if d is not None]
    wrongly = sum(1 for w in result.workers
                  if not _truthy(w.get("byzantine")) and _num(w.get("excluded_at")) is not None)
    also = f"; honest workers excluded: {wrongly}" if wrongly else ""
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    if not attackers:
        right.set_title("detection delay" + also, fontsize=10)
        _note(right, "no byzantine workers")
    elif not delays:
        right.set_title("detection delay" + also, fontsize=10)
        _note(right, f"{len(attackers)} byzantine workers, none excluded")
    else:
        mean = sum(delays) / len(delays)
        right.set_title(f"detection delay: mean {mean:.3g} s, "
                        f"{len(delays)}/{len(attackers)} excluded{also}", fontsize=10)
        right.hist(delays, bins=_bins(delays), color=BYZANTINE_COLOUR, edgecolor="black")
        right.axvline(mean, color="black", linestyle="--", linewidth=1)
    return figure


def plot_payouts(result: Result) -> Figure:
    """The payout distribution: a Lorenz curve with the Gini, and earnings honest vs byzantine."""
    payouts = result.summary.get("payouts")
    earned = [_num(w.get("earned_raven")) or 0.0 for w in result.workers]
    gini = _num(payouts.get("gini")) if isinstance(payouts, dict) else None
    if gini is None:
        gini = _gini(earned)
    figure, (left, right) = _double(result, f"payouts (Gini {gini:.3f})")
    left.set_title("Lorenz curve of worker earnings", fontsize=10)
    left.set_xlabel("share of workers, poorest first (fraction)")
    left.set_ylabel("share of RAVEN earned (fraction)")
    left.plot([0.0, 1.0], [0.0, 1.0], color="grey", linestyle="--", linewidth=1,
              label="equal shares")
    total = sum(earned)
    if not earned:
        _note(left, "no workers")
    elif total <= 0:
        _note(left, "no worker earned anything")
    else:
        xs, ys = _lorenz(earned)
        left.plot(xs, ys, color=HONEST_COLOUR, marker="." if len(xs) <= 30 else None,
                  label=f"{len(earned)} workers, {total:.4g} RAVEN")
        left.set_xlim(0.0, 1.0)
        left.set_ylim(0.0, 1.0)
        _legend(left, location="upper left")

    right.set_title("earnings per worker", fontsize=10)
    right.set_xlabel("earned (RAVEN)")
    right.set_ylabel("workers (count)")
    right.yaxis.set_major_locator(MaxNLocator(integer=True))
    honest = [_num(w.get("earned_raven")) or 0.0 for w in result.workers
              if not _truthy(w.get("byzantine"))]
    attackers = [_num(w.get("earned_raven")) or 0.0 for w in result.workers
                 if _truthy(w.get("byzantine"))]
    if not earned:
        _note(right, "no workers")
    else:
        groups = [(honest, "honest", HONEST_COLOUR), (attackers, "byzantine", BYZANTINE_COLOUR)]
        shown = [(values, f"{label} ({len(values)})", colour)
                 for values, label, colour in groups if values]
        right.hist([v for v, _, _ in shown], bins=_bins(earned), stacked=True,
                   label=[label for _, label, _ in shown],
                   color=[colour for _, _, colour in shown], edgecolor="black")
        _legend(right)
    return figure


def plot_attackers(result: Result) -> Figure:
    """Per byzantine worker, RAVEN earned against stake slashed, with the scenario's totals."""
    attackers = [w for w in result.workers if _truthy(w.get("byzantine"))]
    totals = result.summary.get("attackers")
    totals = totals if isinstance(totals, dict) else {}
    earned_total = _num(totals.get("earned_raven"))
    slashed_total = _num(totals.get("slashed_raven"))
    if earned_total is None:
        earned_total = sum(_num(w.get("earned_raven")) or 0.0 for w in attackers)
    if slashed_total is None:
        slashed_total = sum(_num(w.get("slashed_raven")) or 0.0 for w in attackers)
    what = (f"attackers: earned {earned_total:.4g} RAVEN, "
            f"slashed {slashed_total:.4g} RAVEN in total")
    figure, ax = _single(result, what)
    ax.set_xlabel("byzantine worker (peer id, last characters; * excluded)")
    ax.set_ylabel("RAVEN")
    if not attackers:
        ax.set_title(_title(result, "attackers"))
        ax.set_xticks([])
        ax.set_yticks([])
        _note(ax, "no byzantine workers in this scenario")
        return figure
    earned = [_num(w.get("earned_raven")) or 0.0 for w in attackers]
    slashed = [_num(w.get("slashed_raven")) or 0.0 for w in attackers]
    if len(attackers) > MANY_ATTACKERS:
        ax.scatter(slashed, earned, color=BYZANTINE_COLOUR, alpha=0.7,
                   label=f"{len(attackers)} byzantine workers")
        ax.set_xlabel("stake slashed (RAVEN)")
        ax.set_ylabel("earned (RAVEN)")
        _legend(ax)
        return figure
    positions = list(range(len(attackers)))
    width = 0.4
    ax.bar([p - width / 2 for p in positions], earned, width=width, color="tab:green",
           label="earned")
    ax.bar([p + width / 2 for p in positions], slashed, width=width, color=BYZANTINE_COLOUR,
           label="stake slashed")
    labels = [_peer(w.get("peer_id")) + ("*" if _num(w.get("excluded_at")) is not None else "")
              for w in attackers]
    ax.set_xticks(positions, labels, rotation=45 if len(attackers) > 8 else 0, fontsize=8)
    ax.set_ylim(bottom=0.0)
    _legend(ax)
    return figure


def plot_failover(result: Result) -> Figure:
    """A timeline of master crashes (to their takeover), takeovers and exclusions."""
    figure, ax = _single(result, "crashes, takeovers and exclusions")
    ax.set_xlabel("virtual time (s)")
    rows = ("master crash", "takeover", "excluded (byzantine)", "excluded (honest)")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    crashes = [c for c in _list(result.summary.get("master_crashes")) if isinstance(c, dict)]
    drawn = 0
    for index, crash in enumerate(crashes):
        at = _num(crash.get("at"))
        if at is None:
            continue
        drawn += 1
        ax.plot([at], [0], marker="X", color=BYZANTINE_COLOUR, markersize=9, linestyle="none",
                label="master crash" if drawn == 1 else None)
        taken = _num(crash.get("taken_over_at"))
        lift = 0.15 + 0.12 * (index % 3)
        if taken is None:
            ax.annotate("no takeover", (at, 0), xytext=(at, lift), fontsize=8, ha="left")
            continue
        ax.plot([at, taken], [0, 1], color="grey", linewidth=1.5)
        failover = _num(crash.get("failover_s"))
        failover = taken - at if failover is None else failover
        ax.annotate(f"{failover:.3g} s", ((at + taken) / 2, 0.5), xytext=(4, 0),
                    textcoords="offset points", fontsize=8)
    markers = {"takeover": (1, "^", "tab:green"),
               "excluded byzantine": (2, "v", BYZANTINE_COLOUR),
               "excluded honest": (3, "v", HONEST_COLOUR)}
    for key, (row, marker, colour) in markers.items():
        times = [t for t in (_num(e.get("t")) for e in result.events if _event_key(e) == key)
                 if t is not None]
        if times:
            ax.plot(times, [row] * len(times), marker=marker, color=colour, linestyle="none",
                    markersize=8, label=f"{key} ({len(times)})")
    end = _num(result.summary.get("virtual_seconds"))
    if end is not None and end > 0:
        ax.set_xlim(0.0, end)
    if not drawn:
        anything = any(_event_key(e) in markers for e in result.events)
        _note(ax, "no master crashes" if anything
              else "no master crashes, takeovers or exclusions")
    _legend(ax)
    return figure


PLOTS: tuple[tuple[str, Plot], ...] = (
    ("accuracy.png", plot_accuracy),
    ("throughput.png", plot_throughput),
    ("utilisation.png", plot_utilisation),
    ("bytes.png", plot_bytes),
    ("rejections.png", plot_rejections),
    ("payouts.png", plot_payouts),
    ("attackers.png", plot_attackers),
    ("failover.png", plot_failover),
)
"""The file name of each plot, in the order written."""


# --- figures ----------------------------------------------------------------------------


def _figure(size: tuple[float, float]) -> Figure:
    figure = Figure(figsize=size, dpi=DPI)
    FigureCanvasAgg(figure)
    return figure


def _single(result: Result, what: str) -> tuple[Figure, Axes]:
    figure = _figure(SIZE)
    ax = figure.add_subplot()
    ax.set_title(_title(result, what))
    ax.grid(True, alpha=0.3)
    return figure, ax


def _double(result: Result, what: str) -> tuple[Figure, tuple[Axes, Axes]]:
    figure = _figure(WIDE)
    left, right = figure.subplots(1, 2)
    figure.suptitle(_title(result, what))
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    return figure, (left, right)


def _failed(result: Result, name: str, exc: Exception) -> Figure:
    figure, ax = _single(result, f"{name} could not be drawn")
    ax.set_xticks([])
    ax.set_yticks([])
    _note(ax, f"{type(exc).__name__}: {exc}"[:200])
    return figure


def _save(figure: Figure, path: Path) -> None:
    """Save without the software tag (and so without anything that changes between runs)."""
    figure.tight_layout()
    figure.savefig(path, dpi=DPI, format="png", metadata={"Software": None})
    figure.clear()


def _title(result: Result, what: str) -> str:
    scenario = result.summary.get("scenario") or "unnamed scenario"
    return f"{scenario}: {what}"


def _note(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=11,
            color="dimgrey", wrap=True)


def _line(ax: Axes, points: Sequence[tuple[float, float]], *, label: str, colour: str,
          style: str = "-", step: bool = False) -> None:
    if not points:
        return
    xs = [x for x, _ in points]
    ys = [y for _, y in points]
    marker = "o" if len(points) <= 2 else None
    if step:
        ax.step(xs, ys, where="post", label=label, color=colour, linestyle=style, marker=marker)
    else:
        ax.plot(xs, ys, label=label, color=colour, linestyle=style, marker=marker)


def _legend(*axes: Axes | None, location: Literal["best", "upper left"] = "best",
            reverse: bool = False) -> None:
    """One legend gathering the labelled lines of all `axes` (twin axes too).

    With a twin axis it goes below the plot, where neither axis's lines can hide
    under it or cross it.
    """
    present = [ax for ax in axes if ax is not None]
    handles: list[Any] = []
    labels: list[str] = []
    for ax in present:
        more_handles, more_labels = ax.get_legend_handles_labels()
        handles += more_handles
        labels += more_labels
    if reverse:
        handles, labels = handles[::-1], labels[::-1]
    if not present or not handles:
        return
    if len(present) == 1:
        present[0].legend(handles, labels, loc=location, fontsize=8)
        return
    present[-1].legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.12),
                       ncol=min(4, len(handles)), fontsize=8, frameon=False)


def _crash_lines(ax: Axes, result: Result) -> None:
    """Faint vertical lines where masters crashed, to read dips against."""
    crashes = [c for c in _list(result.summary.get("master_crashes")) if isinstance(c, dict)]
    times = [t for t in (_num(c.get("at")) for c in crashes) if t is not None]
    for index, at in enumerate(times):
        ax.axvline(at, color=BYZANTINE_COLOUR, alpha=0.4, linestyle=":",
                   label="master crash" if index == 0 else None)


# --- data ---------------------------------------------------------------------------------


def _num(value: object) -> float | None:
    """A finite float from a number or numeric text (CSV rows), else None."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, int | float | str):
        try:
            number = float(value)
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _truthy(value: object) -> bool:
    """A flag from a bool or its CSV text."""
    if isinstance(value, str):
        return value.strip().lower() in ("true", "1", "yes")
    return bool(value)


def _list(value: object) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else []


def _points(rows: Iterable[dict[str, Any]], x: str, y: str) -> list[tuple[float, float]]:
    """The (x, y) pairs of `rows` where both are finite numbers, in time order."""
    points = []
    for row in rows:
        xv, yv = _num(row.get(x)), _num(row.get(y))
        if xv is not None and yv is not None:
            points.append((xv, yv))
    return sorted(points, key=lambda p: p[0])


def _jobs(rows: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """The job rows grouped by job, labelled "name id[:8]", in order of first appearance."""
    groups: dict[str, list[dict[str, Any]]] = {}
    labels: dict[str, str] = {}
    for row in rows:
        job = str(row.get("job") or "")
        if job not in labels:
            name = str(row.get("name") or "job")
            labels[job] = f"{name} {job[:8]}".strip()
        groups.setdefault(labels[job], []).append(row)
    return groups


def _delay(worker: dict[str, Any]) -> float | None:
    excluded, first_bad = _num(worker.get("excluded_at")), _num(worker.get("first_bad_at"))
    if excluded is None or first_bad is None:
        return None
    return excluded - first_bad


def _event_key(event: dict[str, Any]) -> str:
    kind = str(event.get("kind") or "")
    if kind == "excluded":
        return "excluded byzantine" if event.get("detail") == "byzantine" else "excluded honest"
    return kind


def _peer(peer_id: object) -> str:
    """A short peer label: libp2p secp256k1 ids all start "16Uiu2H", so their tail."""
    text = str(peer_id or "?")
    return text if len(text) <= 8 else "…" + text[-6:]


def _bins(values: Sequence[float]) -> int | list[float]:
    """Histogram bins: a few around a single value, else up to 20 over the range."""
    low, high = min(values), max(values)
    if high - low <= 0:
        return [low - 0.5, low + 0.5]
    return max(1, min(20, len(values)))


def _lorenz(values: Sequence[float]) -> tuple[list[float], list[float]]:
    """The Lorenz curve of non-negative amounts: (share of people, share of the total)."""
    ordered = sorted(max(0.0, v) for v in values)
    total = sum(ordered)
    xs, ys, running = [0.0], [0.0], 0.0
    for index, value in enumerate(ordered, start=1):
        running += value
        xs.append(index / len(ordered))
        ys.append(running / total if total > 0 else 0.0)
    return xs, ys


def _gini(values: Sequence[float]) -> float:
    """The Gini coefficient, when the summary lacks it (as `sims.world.gini` computes it)."""
    ordered = sorted(values)
    total = sum(ordered)
    if not ordered or total <= 0:
        return 0.0
    n = len(ordered)
    weighted = sum((i + 1) * v for i, v in enumerate(ordered))
    return (2 * weighted) / (n * total) - (n + 1) / n
