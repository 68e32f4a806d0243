"""How a node follows the chain's epochs and knows, by its own computation, who may master a job.

The stake registry elects a committee per epoch and the escrow ranks it per
job, but a node that only read those answers would trust whatever its chain
endpoint says. `CommitteeView` redoes the election from public data instead
(the candidates and stakes the election saw, its seed) with the same rules as
the contracts (`consensus.election`), and treats any difference from what the
chain stored as an error: the node then acts on nothing rather than on a
committee it cannot reproduce.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import trio

from consensus.election import draw_committee, election_seed, eligible, rank_masters
from ravenp2p.chain.base import Chain, ChainError, ElectionTable, JobStatusOnChain

log = logging.getLogger("ravenp2p.committee")

CACHED_EPOCHS = 64  # committees kept: any job's epoch is recent, old ones are recomputed


class CommitteeMismatch(ChainError):
    """What the node recomputed from public chain data differs from what the chain stored."""

    def __init__(self, what: str, computed: object, stored: object) -> None:
        super().__init__(f"{what}: recomputed {computed} but the chain stored {stored}")
        self.computed = computed
        self.stored = stored


def verify_committee(table: ElectionTable, registry: str) -> list[str]:
    """Redo the draw of `table` and return the committee, or raise `CommitteeMismatch`.

    Checks the seed against the parent block's hash and the registry's address
    too, so the committee follows from chain data alone. `registry` is the
    stake registry's address.
    """
    seed = election_seed(table.parent_hash, table.epoch, registry)
    if seed != table.seed:
        raise CommitteeMismatch(
            f"epoch {table.epoch} seed", "0x" + seed.hex(), "0x" + table.seed.hex()
        )
    try:
        members, weights = eligible(
            table.candidates, dict(zip(table.candidates, table.stakes, strict=True)), table.minimum
        )
        computed = draw_committee(members, weights, table.seed, table.committee_size)
    except ValueError as exc:
        raise ChainError(f"epoch {table.epoch}: the election table is invalid: {exc}") from exc
    if computed != list(table.committee):
        raise CommitteeMismatch(f"epoch {table.epoch} committee", computed, list(table.committee))
    return computed


class CommitteeView:
    """A node's view of the epochs: each committee recomputed and checked, the jobs' masters.

    `run` keeps `epoch` and `current_committee` (None until the epoch is
    elected) up to date; the other methods answer for any epoch or job.
    `timeout_s` bounds each round of chain requests in `run`.
    """

    def __init__(self, chain: Chain, poll_s: float = 5.0, *, timeout_s: float = 30.0) -> None:
        if not poll_s > 0:
            raise ValueError(f"poll_s must be positive, got {poll_s!r}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
        self.chain = chain
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.epoch: int | None = None
        self.current_committee: list[str] | None = None
        self._committees: OrderedDict[int, list[str]] = OrderedDict()
        self._master_timeout: int | None = None
        self._last_error: str | None = None

    async def committee(self, epoch: int) -> list[str]:
        """The epoch's committee (EIP-55 addresses, draw order), recomputed and checked.

        Raises ChainError when the epoch is not elected, `CommitteeMismatch`
        when the chain stored another committee than the draw gives.
        """
        cached = self._committees.get(epoch)
        if cached is None:
            table = await self.chain.election_table(epoch)
            cached = verify_committee(table, self.chain.deployment.registry)
            self._committees[epoch] = cached
            if len(self._committees) > CACHED_EPOCHS:
                self._committees.popitem(last=False)
        else:
            self._committees.move_to_end(epoch)
        return list(cached)

    async def job_masters(self, job_id: bytes) -> list[str]:
        """The job's masters in rank order (rank 0 first), checked against the escrow's ranking."""
        job = await self.chain.job(job_id)
        if job.status is JobStatusOnChain.NONE:
            raise ChainError(f"job 0x{job_id.hex()} is not in the escrow")
        ranked = rank_masters(job_id, await self.committee(job.epoch))
        stored = await self.chain.ranked_masters(job_id)
        if ranked != stored:
            raise CommitteeMismatch(f"masters of job 0x{job_id.hex()}", ranked, stored)
        return ranked

    async def master_timeout(self) -> int:
        """The escrow's master timeout in seconds (immutable, so read once)."""
        if self._master_timeout is None:
            self._master_timeout = await self.chain.master_timeout()
        return self._master_timeout

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Follow the epochs until cancelled, polling the chain every `poll_s` seconds.

        Reports started after the first poll. Chain failures are logged and
        retried at the next poll: a node outlives its chain endpoint's outages.
        """
        await self._poll()
        task_status.started()
        while True:
            await trio.sleep(self.poll_s)
            await self._poll()

    async def _poll(self) -> None:
        try:
            with trio.fail_after(self.timeout_s):
                await self._follow()
        except trio.TooSlowError:
            self._report(f"the chain did not answer within {self.timeout_s:g} s")
        except ChainError as exc:
            self._report(str(exc))
        else:
            self._last_error = None

    async def _follow(self) -> None:
        epoch = await self.chain.current_epoch()
        if epoch != self.epoch:
            log.debug("epoch %d began", epoch)
            self.epoch = epoch
            self.current_committee = None
        if self.current_committee is None and await self.chain.is_elected(epoch):
            self.current_committee = await self.committee(epoch)
            log.info("epoch %d committee: %s", epoch, ", ".join(self.current_committee))

    def _report(self, error: str) -> None:
        """Log a failed poll; the same failure again only at debug level, not every poll."""
        level = logging.DEBUG if error == self._last_error else logging.WARNING
        log.log(level, "following epochs: %s (retrying in %g s)", error, self.poll_s)
        self._last_error = error
