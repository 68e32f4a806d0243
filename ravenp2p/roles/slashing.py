"""Turning signed misbehaviour into lost stake: equivocation reports and committee slash orders.

- **Equivocation** (two different digests signed by one worker for one
  calculation) is proof by itself: `report_equivocation` hands both signed
  results to the stake registry, which checks them and slashes; anyone may.
- **Contradictions** (a worker's signed result that disagrees with the
  accepted, co-signed one) are weaker: honest results may disagree now and
  then, so only several of them, on distinct calculations, justify a
  `SlashOrder`, and only when more than half of the epoch's committee signs
  it. `SlashDesk` is a committee member's side of that: it asks the other
  members to co-sign (`request_slash`) and answers their requests on
  `SLASH_PROTOCOL`. A member signs only what it checked itself: the
  membership of both sides, the job's manifest, every signature, the result
  blobs (fetched from the requesting member by digest), that the offender's
  tensors really disagree with the accepted ones (`consensus.agreement`), the
  policy of `consensus.evidence` and the amount against the offender's stake
  on-chain. Each contradiction goes into one order only: a member that signed
  an order remembers its contradictions (in its data folder) and refuses to
  put them into another (asking for the same order again is fine).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import trio

from consensus.agreement import compare_tensors
from consensus.eip712 import from_eth_signature, slash_order_digest
from consensus.evidence import (
    UINT256_MAX,
    Contradiction,
    EvidenceError,
    SlashCase,
    SlashPolicy,
    build_case,
)
from ravenp2p.blocking import run_blocking
from ravenp2p.chain.base import Chain, ChainError, ContractReverted
from ravenp2p.data.blobs import BlobError
from ravenp2p.data.store import check_digest
from ravenp2p.identity import address_of, recover_signer
from ravenp2p.network.base import NetworkError
from ravenp2p.node.node import Node, short
from ravenp2p.roles.escrow import (
    job_key,
    max_calculations,
    peer_address,
    result_domain,
    result_signed_by,
)
from ravenp2p.training.manifest import JobManifest
from ravenp2p.training.tensors import TensorFormatError, decode_tensors, digest_of
from ravenp2p.wire import WireError
from ravenp2p.wire.slash_messages import ContradictionRecord, SlashRequest, SlashSignature

log = logging.getLogger("ravenp2p.slashing")

SLASH_PROTOCOL = "/ravenp2p/slash/1.0.0"
"""Request/response: a committee member asks another to co-sign a slash order."""
SIGNED_ORDERS_FILE = "slash-orders.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024


class SlashRefused(Exception):
    """A member will not sign this order; `reason` says why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@runtime_checkable
class OrderSigner(Protocol):
    """A chain account that can sign `SlashOrder`s as a committee member (`Web3Chain` can)."""

    def sign_slash_order(
        self, offender: str, amount: int, evidence: bytes, epoch: int
    ) -> bytes: ...


def _paid_on(manifest: JobManifest, chain: Chain) -> None:
    """Raise ValueError unless the job's results are signed in this chain's registry domain."""
    if manifest.chain is None:
        raise ValueError(f"job {manifest.job_id[:12]} is unpaid: its results are signed for no "
                         "chain and prove nothing on-chain")
    if manifest.chain != chain.deployment:
        raise ValueError(f"job {manifest.job_id[:12]} is paid on another deployment "
                         f"({manifest.chain}) than this chain's ({chain.deployment})")


async def report_equivocation(
    chain: Chain,
    manifest: JobManifest,
    worker_peer: str,
    calc: int,
    first: tuple[str, bytes],
    second: tuple[str, bytes],
) -> str | None:
    """Submit a worker's two signed results for one calculation to the registry as equivocation.

    `first` and `second` are (hex digest, 65-byte signature). Both are checked
    here first (ValueError names what is wrong: equal digests, a signature
    that is not the worker's, a job not paid on this chain), so no gas is
    spent on evidence the registry would refuse. Returns the transaction
    hash, or None when the registry refuses (already slashed for this
    calculation, nothing staked), which is logged. Raises `ChainError` when
    the chain cannot be reached.
    """
    _paid_on(manifest, chain)
    (digest_a, signature_a), (digest_b, signature_b) = first, second
    check_digest(digest_a, "first digest")
    check_digest(digest_b, "second digest")
    if digest_a == digest_b:
        raise ValueError(f"both results have digest {digest_a[:12]}: that is no equivocation")
    worker = peer_address(worker_peer)
    for which, digest, signature in (("first", digest_a, signature_a),
                                     ("second", digest_b, signature_b)):
        if not result_signed_by(manifest, worker_peer, calc, digest, signature):
            raise ValueError(f"the {which} signature is not {short(worker_peer)}'s signature of "
                             f"digest {digest[:12]} for calculation {calc}")
    try:
        tx = await chain.slash_equivocation(
            worker, job_key(manifest.job_id), calc, bytes.fromhex(digest_a), signature_a,
            bytes.fromhex(digest_b), signature_b,
        )
    except ContractReverted as exc:
        log.warning("The registry refused to slash %s for equivocating on calculation %d of "
                    "job %s: %s", short(worker_peer), calc, short(manifest.job_id), exc.reason)
        return None
    log.info("Reported %s for equivocating on calculation %d of job %s (tx %s)",
             short(worker_peer), calc, short(manifest.job_id), tx)
    return tx


@dataclass(frozen=True)
class SlashConfig:
    """How a committee member vets and requests slash orders."""

    policy: SlashPolicy = field(default_factory=SlashPolicy)
    check_timeout_s: float = 25.0
    """Time to vet one request; below the network's request-handler timeout (30 s)."""
    request_timeout_s: float = 35.0
    """How long a requesting member waits for each other member's answer."""
    max_result_bytes: int = 512 * 1024 * 1024

    def __post_init__(self) -> None:
        if not isinstance(self.policy, SlashPolicy):
            raise ValueError(f"policy must be a SlashPolicy, got {type(self.policy).__name__}")
        if not self.check_timeout_s > 0 or not self.request_timeout_s > 0:
            raise ValueError("check_timeout_s and request_timeout_s must be positive")
        if self.max_result_bytes < 1:
            raise ValueError("max_result_bytes must be positive")


@dataclass(frozen=True)
class _Vetted:
    """An order a member checked and is ready to sign."""

    case: SlashCase
    amount: int
    epoch: int

    @property
    def order_id(self) -> str:
        return f"{self.case.evidence.hex()}:{self.epoch}:{self.amount}"

    def contradiction_keys(self) -> list[str]:
        return [f"{self.case.offender}:{self.case.job.hex()}:{c.calculation}"
                for c in self.case.contradictions]


class SlashDesk:
    """A committee member's slashing desk: co-signs checked orders, requests its own.

    Add `run` to the node's roles (`node.add_role(desk.run)`); it serves
    `SLASH_PROTOCOL`. The desk needs the node's chain account.
    """

    def __init__(self, node: Node, config: SlashConfig | None = None) -> None:
        self.node = node
        self.config = config or SlashConfig()
        self._path = Path(node.config.data_dir) / SIGNED_ORDERS_FILE
        self._signed: dict[str, str] = self._load()
        """(offender, job, calculation) -> the one order this member signed it into."""

    @property
    def signed_contradictions(self) -> dict[str, str]:
        """What this member signed: "offender:job:calculation" -> "evidence:epoch:amount"."""
        return dict(self._signed)

    async def run(
        self, *, task_status: trio.TaskStatus[SlashDesk] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve co-signing requests until cancelled."""
        self.node.network.set_request_handler(SLASH_PROTOCOL, self._serve)
        task_status.started(self)
        await trio.sleep_forever()

    # --- asking the committee -------------------------------------------------------
    async def request_slash(
        self,
        manifest: JobManifest,
        offender_peer: str,
        contradictions: Sequence[ContradictionRecord],
        committee_peers: Iterable[str],
    ) -> str | None:
        """Have a majority of the committee sign a slash order against `offender_peer`, submit it.

        The order is for the current epoch, or the previous one while its
        orders are still valid, whichever has this node in its committee; the
        amount is what the policy allows of the offender's stake now. This
        node vets its own order like any member would, then asks the other
        members concurrently (`committee_peers` names their peer ids; others
        are looked up in the node's directory) until a majority signed. The
        result blobs and the manifest must be in this node's store (pinned)
        until then: the members fetch them from it.

        Returns the transaction hash, or None when the order was not made or
        not executed (every reason logged). Raises ValueError for malformed
        arguments and `ChainError` when the chain cannot be reached.
        """
        chain = self.node.chain
        if chain is None:
            raise ValueError("this node has no chain account to order a slash with")
        _paid_on(manifest, chain)
        offender = peer_address(offender_peer)
        peers = list(committee_peers)
        known = {peer_address(peer): peer for peer in peers}
        found = await self._own_committee(chain)
        if found is None:
            return None
        epoch, committee = found
        stake = await chain.stake_of(offender)
        amount = self.config.policy.allowed_amount(stake.active + stake.unbonding)
        if amount == 0:
            log.warning("Not ordering a slash of %s: it has no stake to slash",
                        short(offender_peer))
            return None
        request = SlashRequest(job=manifest.job_id, offender=offender_peer, epoch=epoch,
                               amount=str(amount), contradictions=tuple(contradictions))
        request.validate()
        vetted, own = await self._consider(self.node.peer_id, request)
        if vetted is None:
            log.warning("Not ordering a slash of %s in job %s: %s", short(offender_peer),
                        short(manifest.job_id), own.reason)
            return None
        signatures = {chain.address: own.signature}
        needed = len(committee) // 2 + 1
        digest = slash_order_digest(result_domain(manifest), offender, amount,
                                    vetted.case.evidence, epoch)
        reasons: dict[str, str] = {}

        async def ask(member: str, peer: str, done: trio.CancelScope) -> None:
            answer = await self._ask(peer, request, member, digest)
            if isinstance(answer, bytes):
                signatures[member] = answer
                if len(signatures) >= needed:
                    done.cancel()
            else:
                reasons[member] = answer

        async with trio.open_nursery() as nursery:
            for member in committee:
                if member == chain.address:
                    continue
                peer = known.get(member) or self.node.peer_with_address(member)
                if peer is None:
                    reasons[member] = "no known peer id for this member"
                    continue
                nursery.start_soon(ask, member, peer, nursery.cancel_scope)
        if len(signatures) < needed:
            log.warning(
                "Slash order against %s not made: %d of the %d signatures needed in epoch %d's "
                "committee; %s", short(offender_peer), len(signatures), needed, epoch,
                "; ".join(f"{member}: {why}" for member, why in sorted(reasons.items())),
            )
            return None
        try:
            tx = await chain.slash_by_committee(offender, amount, vetted.case.evidence, epoch,
                                                list(signatures.values())[:needed])
        except ContractReverted as exc:
            log.warning("The registry refused the slash order against %s: %s",
                        short(offender_peer), exc.reason)
            return None
        log.info("Slashed %s by committee order: %d base units for %d contradictions in job %s "
                 "(tx %s)", short(offender_peer), amount, len(vetted.case.contradictions),
                 short(manifest.job_id), tx)
        return tx

    async def _own_committee(self, chain: Chain) -> tuple[int, list[str]] | None:
        """The epoch whose committee has this node and whose orders are still valid, if any."""
        current = await chain.current_epoch()
        for epoch in (current, current - 1):
            if epoch < 0:
                continue
            committee = await chain.committee(epoch)
            if chain.address in committee:
                return epoch, committee
        log.warning("Cannot order a slash: this node is in the committee of neither epoch %d "
                    "nor the one before", current)
        return None

    async def _ask(
        self, peer: str, request: SlashRequest, member: str, digest: bytes
    ) -> bytes | str:
        """Member `member`'s verified signature of the order, or why there is none."""
        timeout = self.config.request_timeout_s
        try:
            raw = self.node.codec.seal(request, context=SLASH_PROTOCOL)
            with trio.fail_after(timeout + 1):
                reply = await self.node.network.request(peer, SLASH_PROTOCOL, raw,
                                                        timeout=timeout)
            answer = self.node.codec.open(reply, context=SLASH_PROTOCOL, from_peer=peer).message
        except (NetworkError, WireError) as exc:
            return f"no answer ({exc})"
        except trio.TooSlowError:
            return f"no answer within {timeout:.0f} s"
        if not isinstance(answer, SlashSignature):
            return f"answered with a {answer.TYPE} message"
        if not answer.signed:
            return f"refused: {answer.reason}"
        try:
            signer = address_of(recover_signer(digest, from_eth_signature(answer.signature)))
        except ValueError as exc:
            return f"sent an unusable signature ({exc})"
        if signer != member:
            return f"sent a signature by {signer}, not its own"
        return answer.signature

    # --- answering the committee ------------------------------------------------------
    async def _serve(self, peer: str, raw: bytes) -> bytes:
        """The `SLASH_PROTOCOL` handler: a signature or a refusal, never an exception."""
        try:
            request = self.node.codec.open(raw, context=SLASH_PROTOCOL, from_peer=peer).message
        except WireError as exc:
            answer = SlashSignature(reason=f"malformed request: {exc}"[:1024])
        else:
            if isinstance(request, SlashRequest):
                _, answer = await self._consider(peer, request)
            else:
                answer = SlashSignature(reason=f"expected {SlashRequest.TYPE}, got {request.TYPE}")
        if not answer.signed:
            log.info("Refused to co-sign a slash order for %s: %s", short(peer), answer.reason)
        return self.node.codec.seal(answer, context=SLASH_PROTOCOL)

    async def _consider(
        self, peer: str, request: SlashRequest
    ) -> tuple[_Vetted | None, SlashSignature]:
        """Vet `peer`'s request and sign it, or say why not; bounded by `check_timeout_s`."""
        reason = ""
        with trio.move_on_after(self.config.check_timeout_s):
            try:
                vetted = await self._vet(peer, request)
                signature = self._sign(vetted)
            except SlashRefused as exc:
                reason = exc.reason
            except (ChainError, BlobError, NetworkError, ValueError) as exc:
                reason = f"{type(exc).__name__}: {exc}"
            else:
                return vetted, SlashSignature(signature=signature)
        return None, SlashSignature(
            reason=(reason or f"could not check the evidence within "
                              f"{self.config.check_timeout_s:.0f} s")[:1024]
        )

    async def _vet(self, peer: str, request: SlashRequest) -> _Vetted:
        """Every check a member makes before signing; `SlashRefused` says which failed."""
        chain = self.node.chain
        if chain is None:
            raise SlashRefused("this node has no chain account")
        offender = _address_of_peer("the offender", request.offender)
        requester = _address_of_peer("the requesting peer", peer)
        amount = int(request.amount)
        if amount > UINT256_MAX:
            raise SlashRefused(f"the amount {amount} does not fit in uint256")
        await self._check_committee(chain, request.epoch, requester)
        manifest = await self._manifest(peer, request.job)
        try:
            _paid_on(manifest, chain)
        except ValueError as exc:
            raise SlashRefused(str(exc)) from None
        contradictions = self._contradictions(manifest, request, offender)
        try:
            case = build_case(contradictions, manifest.spec.redundancy, self.config.policy)
        except EvidenceError as exc:
            raise SlashRefused(str(exc)) from None
        self._check_signatures(manifest, request)
        stake = await chain.stake_of(offender)
        try:
            self.config.policy.check_amount(amount, stake.active + stake.unbonding)
        except EvidenceError as exc:
            raise SlashRefused(str(exc)) from None
        vetted = _Vetted(case, amount, request.epoch)
        self._check_unused(vetted)
        for record in request.contradictions:
            await self._check_disagreement(peer, record)
        return vetted

    async def _check_committee(self, chain: Chain, epoch: int, requester: str) -> None:
        current = await chain.current_epoch()
        if epoch > current:
            raise SlashRefused(f"epoch {epoch} has not begun (the chain is in epoch {current})")
        if epoch + 1 < current:
            raise SlashRefused(f"orders of epoch {epoch} have expired (the chain is in epoch "
                               f"{current}; an order is valid in its epoch and the next)")
        committee = await chain.committee(epoch)
        if not committee:
            raise SlashRefused(f"epoch {epoch} has no elected committee")
        if chain.address not in committee:
            raise SlashRefused(f"this node ({chain.address}) is not in the committee of "
                               f"epoch {epoch}")
        if requester not in committee:
            raise SlashRefused(f"the requesting peer ({requester}) is not in the committee of "
                               f"epoch {epoch}")

    async def _fetch(self, peer: str, digest: str, what: str) -> bytes:
        try:
            raw = await self.node.blobs.fetch(digest, providers=[peer], announce=False,
                                              timeout=self.config.check_timeout_s)
        except (BlobError, trio.TooSlowError) as exc:
            raise SlashRefused(f"could not fetch {what} {digest[:12]} from the requesting "
                               f"peer: {exc or 'timed out'}") from None
        if digest_of(raw) != digest:
            raise SlashRefused(f"{what} {digest[:12]} does not have that digest")
        return raw

    async def _manifest(self, peer: str, job: str) -> JobManifest:
        raw = await self._fetch(peer, job, "the job manifest")
        if len(raw) > MAX_MANIFEST_BYTES:
            raise SlashRefused(f"the job manifest has {len(raw)} bytes, more than "
                               f"{MAX_MANIFEST_BYTES}")
        try:
            return JobManifest.decode(raw)
        except ValueError as exc:
            raise SlashRefused(f"the job manifest is not valid: {exc}") from None

    def _contradictions(
        self, manifest: JobManifest, request: SlashRequest, offender: str
    ) -> list[Contradiction]:
        limit = max_calculations(manifest)
        key = job_key(manifest.job_id)
        items = []
        for record in request.contradictions:
            if record.calc >= limit:
                raise SlashRefused(f"calculation {record.calc} is beyond the job's {limit} "
                                   "calculations")
            accepted = tuple(
                (_address_of_peer(f"accepted worker {short(s.worker)}", s.worker), s.signature)
                for s in record.accepted
            )
            items.append(Contradiction(
                job=key, calculation=record.calc, offender=offender,
                digest=bytes.fromhex(record.digest), signature=record.signature,
                accepted_digest=bytes.fromhex(record.accepted_digest), accepted=accepted,
            ))
        return items

    @staticmethod
    def _check_signatures(manifest: JobManifest, request: SlashRequest) -> None:
        for record in request.contradictions:
            calc = record.calc
            if not result_signed_by(manifest, request.offender, calc, record.digest,
                                    record.signature):
                raise SlashRefused(f"calculation {calc}: the offender's signature of digest "
                                   f"{record.digest[:12]} is not the offender's")
            for signer in record.accepted:
                if not result_signed_by(manifest, signer.worker, calc, record.accepted_digest,
                                        signer.signature):
                    raise SlashRefused(
                        f"calculation {calc}: the signature of accepted worker "
                        f"{short(signer.worker)} is not that worker's signature of digest "
                        f"{record.accepted_digest[:12]}"
                    )

    async def _check_disagreement(self, peer: str, record: ContradictionRecord) -> None:
        """Raise `SlashRefused` unless the offender's result really disagrees with the accepted."""
        calc = record.calc
        accepted_raw = await self._fetch(peer, record.accepted_digest,
                                         f"the accepted result of calculation {calc}")
        offender_raw = await self._fetch(peer, record.digest,
                                         f"the offender's result of calculation {calc}")
        limit = self.config.max_result_bytes

        def compare() -> str:
            try:
                accepted = decode_tensors(accepted_raw, max_bytes=limit)
            except TensorFormatError as exc:
                return f"calculation {calc}: the accepted result is not a tensor set ({exc})"
            try:
                offered = decode_tensors(offender_raw, max_bytes=limit)
            except TensorFormatError:
                return ""  # the offender signed bytes that are no result at all
            verdict = compare_tensors(offered, accepted)
            if verdict.agree:
                return (f"calculation {calc}: the offender's result agrees with the accepted "
                        f"one ({verdict.reason}); honest results may differ that much")
            return ""

        problem = await run_blocking(compare)
        if problem:
            raise SlashRefused(problem)

    # --- one order per contradiction ---------------------------------------------------
    def _check_unused(self, vetted: _Vetted) -> None:
        order = vetted.order_id
        for key in vetted.contradiction_keys():
            signed = self._signed.get(key)
            if signed is not None and signed != order:
                offender, _, calc = key.split(":")
                raise SlashRefused(f"calculation {calc}'s contradiction by {offender} is already "
                                   "in another slash order this member signed")

    def _sign(self, vetted: _Vetted) -> bytes:
        """Sign the order and remember its contradictions (checked again: no await since)."""
        chain = self.node.chain
        if not isinstance(chain, OrderSigner):
            raise SlashRefused("this node's chain account cannot sign slash orders")
        self._check_unused(vetted)
        signature = chain.sign_slash_order(vetted.case.offender, vetted.amount,
                                           vetted.case.evidence, vetted.epoch)
        for key in vetted.contradiction_keys():
            self._signed[key] = vetted.order_id
        self._save()
        return signature

    def _load(self) -> dict[str, str]:
        try:
            data = json.loads(self._path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("Ignoring an unreadable record of signed slash orders %s: %s",
                        self._path, exc)
            return {}
        orders = data.get("contradictions") if isinstance(data, dict) else None
        if not isinstance(orders, Mapping):
            log.warning("Ignoring a malformed record of signed slash orders %s", self._path)
            return {}
        return {k: v for k, v in orders.items() if isinstance(k, str) and isinstance(v, str)}

    def _save(self) -> None:
        tmp = self._path.with_suffix(".tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps({"contradictions": self._signed}, sort_keys=True))
            os.replace(tmp, self._path)
        except OSError as exc:
            log.warning("Could not record the signed slash orders in %s: %s", self._path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()


def _address_of_peer(who: str, peer: str) -> str:
    try:
        return peer_address(peer)
    except ValueError as exc:
        raise SlashRefused(f"{who} is not a valid peer id: {exc}") from None

