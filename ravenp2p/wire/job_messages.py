"""Message types of a training job: submission, assignments, results, round records.

Every one travels in a signed envelope (`ravenp2p.wire.envelope`), so its sender
is authenticated; the fields below are what the roles read. Digests are hex
sha256 of canonical blob bytes (`ravenp2p.training.tensors.digest_of`).
"""

from __future__ import annotations

from dataclasses import dataclass

from ravenp2p.wire.messages import ADDRESS_PATTERN, PEER_ID_PATTERN
from ravenp2p.wire.schema import Message, constrained, register

DIGEST_PATTERN = r"[0-9a-f]{64}"
MAX_CALCULATIONS_PER_MESSAGE = 256
MAX_WORKERS_PER_CALCULATION = 32
MAX_MASTERS = 256
"""A committee has at most this many members (the registry's candidate bound)."""
CALCULATION_KINDS = ("gradient", "local_steps")


@register
@dataclass(frozen=True)
class JobSubmit(Message):
    """A requester asks a master to run the job whose manifest blob has this digest.

    The job id is the manifest digest; the master fetches the manifest from the
    requester (the envelope's sender) and checks it before answering.
    """

    TYPE = "job.submit"

    manifest: str = constrained(pattern=DIGEST_PATTERN)
    manifest_size: int = constrained(min=1, max=64 * 1024 * 1024)


@register
@dataclass(frozen=True)
class JobReceipt(Message):
    """A master's answer to `JobSubmit`: queued, or refused with the reason."""

    TYPE = "job.receipt"

    job: str = constrained(pattern=DIGEST_PATTERN)
    accepted: bool = constrained()
    reason: str = constrained(max_len=1024, default="")
    queue_position: int = constrained(min=0, default=0)


@register
@dataclass(frozen=True)
class JobAnnounce(Message):
    """A master tells compute nodes that it runs a job (on the jobs topic)."""

    TYPE = "job.announce"

    job: str = constrained(pattern=DIGEST_PATTERN)
    requester: str = constrained(pattern=PEER_ID_PATTERN)
    manifest_size: int = constrained(min=1, max=64 * 1024 * 1024)
    masters: tuple[str, ...] = constrained(max_len=MAX_MASTERS, pattern=ADDRESS_PATTERN,
                                           default=())
    """A paid job's masters in rank order (the escrow's), empty for an unpaid job."""
    rank: int = constrained(min=0, max=MAX_MASTERS - 1, default=0)
    """The announcing master's rank among `masters`."""
    sample: float = constrained(min=0.0, max=1.0, default=1.0)
    """The share of workers the job draws (`consensus.assignment.in_job_sample`): the
    others do not join. A master short of workers announces again with a larger one."""


@register
@dataclass(frozen=True)
class MasterHeartbeat(Message):
    """The job's master is alive and at this round (on the job's reliable topic, every second).

    Committee members ranked after it take the job over when these stop.
    """

    TYPE = "job.heartbeat"

    job: str = constrained(pattern=DIGEST_PATTERN)
    rank: int = constrained(min=0, max=MAX_MASTERS - 1)
    round: int = constrained(min=0)
    weights: str = constrained(pattern=DIGEST_PATTERN)


@register
@dataclass(frozen=True)
class MasterTakeover(Message):
    """A committee member took the job over (the escrow agreed) and resumes it at `round`.

    From then on peers act only on its messages; the replaced master's are rejected.
    """

    TYPE = "job.takeover"

    job: str = constrained(pattern=DIGEST_PATTERN)
    rank: int = constrained(min=1, max=MAX_MASTERS - 1)
    replaced_rank: int = constrained(min=0, max=MAX_MASTERS - 1)
    round: int = constrained(min=0)
    weights: str = constrained(pattern=DIGEST_PATTERN)


@register
@dataclass(frozen=True)
class ReplicaOffer(Message):
    """The master hands a committee member the state to resume the job from (each round).

    `checkpoint` is the digest of the checkpoint blob (msgpack: round,
    weights and optimizer digests, credits, the last round record, ...); the
    member fetches it and the tensors it names from the master before it acks.
    """

    TYPE = "job.replica"

    job: str = constrained(pattern=DIGEST_PATTERN)
    manifest_size: int = constrained(min=1, max=64 * 1024 * 1024)
    rank: int = constrained(min=0, max=MAX_MASTERS - 1)
    round: int = constrained(min=0)
    checkpoint: str = constrained(pattern=DIGEST_PATTERN)
    checkpoint_size: int = constrained(min=1, max=64 * 1024 * 1024)


@register
@dataclass(frozen=True)
class ReplicaAck(Message):
    """A committee member's answer to `ReplicaOffer`: stored (it can resume the job), or why not."""

    TYPE = "job.replica_ack"

    job: str = constrained(pattern=DIGEST_PATTERN)
    round: int = constrained(min=0)
    stored: bool = constrained()
    reason: str = constrained(max_len=512, default="")


@register
@dataclass(frozen=True)
class CalculationOrder(Message):
    """One calculation and the workers asked to compute it.

    A calculation is named by job, round, weights digest, shard digest and
    kind; `calc` is its number within the job. `seed` seeds dropout so that
    redundant workers compute the same thing; `threads` pins the compute
    profile for bitwise agreement.
    """

    TYPE = "job.calculation"

    calc: int = constrained(min=0)
    round: int = constrained(min=0)
    kind: str = constrained(choices=CALCULATION_KINDS)
    weights: str = constrained(pattern=DIGEST_PATTERN)
    shard: str = constrained(pattern=DIGEST_PATTERN)
    seed: int = constrained(min=0, max=2**63 - 1)
    threads: int = constrained(min=1, max=64)
    workers: tuple[str, ...] = constrained(
        max_len=MAX_WORKERS_PER_CALCULATION, pattern=PEER_ID_PATTERN
    )
    deadline_s: float = constrained(min=0.1, max=3600.0)


@register
@dataclass(frozen=True)
class Assignment(Message):
    """The master's signed orders for one round (or extra workers for some calculations)."""

    TYPE = "job.assign"

    job: str = constrained(pattern=DIGEST_PATTERN)
    round: int = constrained(min=0)
    orders: tuple[CalculationOrder, ...] = constrained(max_len=MAX_CALCULATIONS_PER_MESSAGE)


@register
@dataclass(frozen=True)
class ResultHeader(Message):
    """A worker's signed claim: "for this calculation my result has this digest".

    Sent ahead of the result bytes on a stream to the master. The envelope
    authenticates the worker to the master; `signature` is the worker's EIP-712
    signature of Result(job, calc, digest) in the job's chain domain, which
    anyone (the stake registry included) can check: two of them with different
    digests for one calculation are slashable equivocation.
    """

    TYPE = "job.result"

    job: str = constrained(pattern=DIGEST_PATTERN)
    calc: int = constrained(min=0)
    round: int = constrained(min=0)
    digest: str = constrained(pattern=DIGEST_PATTERN)
    size: int = constrained(min=1, max=1024 * 1024 * 1024)
    loss: float = constrained()
    compute_ms: float = constrained(min=0.0)
    signature: bytes = constrained(min_len=65, max_len=65)


@register
@dataclass(frozen=True)
class ResultAck(Message):
    """The master's reply to a result: taken for voting, or refused and why."""

    TYPE = "job.result_ack"

    calc: int = constrained(min=0)
    taken: bool = constrained()
    reason: str = constrained(max_len=512, default="")


@register
@dataclass(frozen=True)
class AcceptedCalculation(Message):
    """A calculation the vote accepted: its result and the workers credited for it."""

    TYPE = "job.accepted"

    calc: int = constrained(min=0)
    shard: str = constrained(pattern=DIGEST_PATTERN)
    result: str = constrained(pattern=DIGEST_PATTERN)
    workers: tuple[str, ...] = constrained(
        max_len=MAX_WORKERS_PER_CALCULATION, pattern=PEER_ID_PATTERN
    )


@register
@dataclass(frozen=True)
class RoundRecord(Message):
    """The master's signed record of a finished round: what was accepted, the new weights."""

    TYPE = "job.round"

    job: str = constrained(pattern=DIGEST_PATTERN)
    round: int = constrained(min=0)
    previous_weights: str = constrained(pattern=DIGEST_PATTERN)
    weights: str = constrained(pattern=DIGEST_PATTERN)
    accepted: tuple[AcceptedCalculation, ...] = constrained(
        max_len=MAX_CALCULATIONS_PER_MESSAGE
    )
    train_loss: float = constrained()


@register
@dataclass(frozen=True)
class Evaluation(Message):
    """The requester's signed score of one round's weights on its holdout split."""

    TYPE = "job.evaluation"

    job: str = constrained(pattern=DIGEST_PATTERN)
    round: int = constrained(min=0)
    weights: str = constrained(pattern=DIGEST_PATTERN)
    loss: float = constrained()
    samples: int = constrained(min=0)
    accuracy: float | None = constrained(min=0.0, max=1.0, default=None)


@register
@dataclass(frozen=True)
class WorkerCredit(Message):
    """How many accepted calculations a worker is paid for, and its recorded faults.

    `partner` is the website partner the registry named for the worker when a
    paid job settled ("" for none, or an unpaid job): part of what the
    settled payout tree was built from, so workers rebuild the same tree.
    """

    TYPE = "job.credit"

    worker: str = constrained(pattern=PEER_ID_PATTERN)
    accepted: int = constrained(min=0)
    mismatches: int = constrained(min=0)
    excluded: bool = constrained()
    partner: str = constrained(pattern=f"({ADDRESS_PATTERN})?", default="")


@register
@dataclass(frozen=True)
class JobDone(Message):
    """The master's final word on a job: why it stopped, the weights, who earned what."""

    TYPE = "job.done"

    job: str = constrained(pattern=DIGEST_PATTERN)
    rounds: int = constrained(min=0)
    weights: str = constrained(pattern=DIGEST_PATTERN)
    reason: str = constrained(max_len=256)
    calculations_accepted: int = constrained(min=0)
    results_rejected: int = constrained(min=0)
    credits: tuple[WorkerCredit, ...] = constrained(max_len=4096)
    settle_tx: str = constrained(pattern=r"(0x[0-9a-f]{64})?", default="")
    """The escrow settlement's transaction hash, for a paid job that settled."""


@register
@dataclass(frozen=True)
class JobCancel(Message):
    """The requester asks the job's master to stop (on the job's topic).

    The master finishes the round in progress, then ends the job as usual: a
    paid job settles what was accepted so far and the escrow refunds the rest
    of the deposit. Only the job's requester (the envelope's sender) may cancel.
    """

    TYPE = "job.cancel"

    job: str = constrained(pattern=DIGEST_PATTERN)
    reason: str = constrained(max_len=256, default="")
