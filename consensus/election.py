"""Master election: the stake-weighted committee draw, master ranking and takeover timing.

The same rules as the stake registry and job escrow contracts (see
docs/economics.md, "Election"), bit for bit: a node can predict or check the
committee and the master order of any job from public chain data alone.
Addresses are returned in the form they were given (EIP-55 or lowercase).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from consensus.abi import (
    UINT256_MAX,
    address_word,
    bytes32_word,
    checksum_address,
    keccak256,
    uint_word,
)


def _check_distinct(addresses: Sequence[str], what: str) -> None:
    seen: set[str] = set()
    for address in addresses:
        canonical = checksum_address(address)
        if canonical in seen:
            raise ValueError(f"{what}: {address} appears more than once")
        seen.add(canonical)


def eligible(
    candidates: Sequence[str], stakes: Mapping[str, int], minimum: int
) -> tuple[list[str], list[int]]:
    """The election table: candidates with `active stake >= minimum`, weighted by that stake.

    `candidates` is the registry's candidate list in storage order and
    `stakes` each candidate's active stake (keys matched case-insensitively).
    The order is kept, because the draw depends on it.
    """
    if isinstance(minimum, bool) or not isinstance(minimum, int) or minimum < 1:
        raise ValueError(f"minimum stake must be a positive integer, got {minimum!r}")
    _check_distinct(candidates, "candidates")
    by_address: dict[str, int] = {}
    for address, stake in stakes.items():
        canonical = checksum_address(address)
        if canonical in by_address:
            raise ValueError(f"stakes: {address} appears more than once")
        by_address[canonical] = stake
    table: list[str] = []
    weights: list[int] = []
    for candidate in candidates:
        canonical = checksum_address(candidate)
        if canonical not in by_address:
            raise ValueError(f"stakes: no stake given for candidate {candidate}")
        stake = by_address[canonical]
        if stake < 0:
            raise ValueError(f"stakes: negative stake {stake} for candidate {candidate}")
        if stake >= minimum:
            table.append(candidate)
            weights.append(stake)
    return table, weights


def draw_committee(
    candidates: Sequence[str], weights: Sequence[int], seed: bytes, k: int
) -> list[str]:
    """Up to `k` distinct candidates drawn with probability proportional to weight.

    Draw `i` takes `r = uint256(keccak256(abi.encode(seed, i))) % total` and
    picks the first table entry whose cumulative weight exceeds `r`; the picked
    entry's weight leaves the total and the last entry moves into its slot.
    Returns `min(k, len(candidates))` members in draw order.
    """
    if len(candidates) != len(weights):
        raise ValueError(
            f"{len(candidates)} candidates but {len(weights)} weights: lengths must match"
        )
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"committee size k must be a positive integer, got {k!r}")
    bytes32_word(seed, "seed")
    _check_distinct(candidates, "candidates")
    for candidate, weight in zip(candidates, weights, strict=True):
        if isinstance(weight, bool) or not isinstance(weight, int) or weight <= 0:
            raise ValueError(f"candidate {candidate} has weight {weight!r}: must be positive")
    total = sum(weights)
    if total > UINT256_MAX:
        raise ValueError(f"total weight {total} does not fit in uint256")

    table = list(candidates)
    table_weights = list(weights)
    committee: list[str] = []
    for i in range(min(k, len(table))):
        r = int.from_bytes(keccak256(seed + uint_word(i)), "big") % total
        acc = 0
        j = 0
        while True:
            acc += table_weights[j]
            if r < acc:
                break
            j += 1
        committee.append(table[j])
        total -= table_weights[j]
        table[j] = table[-1]
        table_weights[j] = table_weights[-1]
        table.pop()
        table_weights.pop()
    return committee


def master_key(job_id: bytes, member: str) -> int:
    """A member's ranking key for a job: `uint256(keccak256(abi.encode(jobId, member)))`."""
    return int.from_bytes(keccak256(bytes32_word(job_id, "job id") + address_word(member)), "big")


def rank_masters(job_id: bytes, committee: Sequence[str]) -> list[str]:
    """The committee in master order for a job: rank 0 (first master) first."""
    bytes32_word(job_id, "job id")
    _check_distinct(committee, "committee")
    return sorted(committee, key=lambda member: master_key(job_id, member))


def epoch_of(timestamp: int, genesis: int, epoch_length: int) -> int:
    """The registry's epoch at `timestamp`: `(timestamp - genesis) / epochLength`."""
    if epoch_length < 1:
        raise ValueError(f"epoch length must be positive, got {epoch_length}")
    if timestamp < genesis:
        raise ValueError(f"timestamp {timestamp} is before the registry's genesis {genesis}")
    return (timestamp - genesis) // epoch_length


def election_seed(previous_block_hash: bytes, epoch: int, registry: str) -> bytes:
    """An epoch's seed: `keccak256(abi.encode(blockhash(n - 1), epoch, registry))`."""
    return keccak256(
        bytes32_word(previous_block_hash, "previous block hash")
        + uint_word(epoch)
        + address_word(registry)
    )


def takeover_time(current_rank: int, rank: int, last_heartbeat: int, timeout: int) -> int:
    """The earliest timestamp at which the master ranked `rank` may take over the job.

    A higher rank waits one `timeout` per rank it skips, so the next master in
    line gets the first chance and later ones step in only if it is silent too.
    """
    if current_rank < 0:
        raise ValueError(f"current rank must not be negative, got {current_rank}")
    if rank <= current_rank:
        raise ValueError(f"rank {rank} cannot take over from rank {current_rank}: must be above")
    if timeout < 1:
        raise ValueError(f"master timeout must be positive, got {timeout}")
    return last_heartbeat + (rank - current_rank) * timeout


def ranks_allowed_to_take_over(
    committee_size: int, current_rank: int, last_heartbeat: int, now: int, timeout: int
) -> range:
    """The ranks that may call `takeOver` at `now` (empty while the master is within its timeout).

    They are `current_rank + 1 .. current_rank + (now - last_heartbeat) // timeout`,
    bounded by the committee size.
    """
    if committee_size < 1:
        raise ValueError(f"committee size must be positive, got {committee_size}")
    if not 0 <= current_rank < committee_size:
        raise ValueError(f"current rank {current_rank} is outside a committee of {committee_size}")
    if timeout < 1:
        raise ValueError(f"master timeout must be positive, got {timeout}")
    steps = max(0, (now - last_heartbeat) // timeout)
    return range(current_rank + 1, min(committee_size, current_rank + steps + 1))
