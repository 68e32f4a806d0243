"""The requester's async client against a devnet: cancel a job, and refusals.

Real py-libp2p hosts on loopback, real torch training on digits, the real
contracts on the embedded chain. The async client talks to the devnet's
requester through its control socket, as a script would.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import trio
from integration.trained import QUICK_SPEC

from consensus.settlement import MARGIN_PERCENT
from ravenp2p.client import AsyncClient, ClientError, JobFailed
from ravenp2p.devnet import start_devnet
from ravenp2p.roles.escrow import job_key
from ravenp2p.training.spec import format_amount, load_job_spec, parse_amount

JOB_TIMEOUT = 240.0


async def test_a_client_cancels_a_job_and_the_escrow_refunds_the_rest(tmp_path: Path) -> None:
    requester_dir = tmp_path / "requester"
    async with start_devnet(3, masters=2, economy=True, requester_dir=requester_dir) as net:
        money = net.economy
        assert money is not None
        address = net.requester.node.identity.address
        await money.owner.mint(address, 10 * 10**18)
        client = AsyncClient(requester_dir, start_node=False)
        assert (await client.connect())["peer_id"] == net.requester.node.peer_id

        spec = load_job_spec(QUICK_SPEC)
        # A job that could run 200 rounds, cancelled early: settled, the rest refunded.
        endless = dataclasses.replace(
            spec, name="digits-cancelled",
            stop=dataclasses.replace(spec.stop, target_accuracy=None, max_rounds=200),
            budget=parse_amount("budget", "2"),
        )
        balance_before = await money.owner.balance_of(address)
        job = await client.submit(endless)
        with trio.fail_after(JOB_TIMEOUT):
            while (await job.status()).round < 2:
                await trio.sleep(0.2)
        assert (await job.cancel("enough")).state == "cancelling"
        status = await job.wait(timeout=JOB_TIMEOUT)
        assert status.state == "cancelled", status.reason
        assert "enough" in status.reason and status.round < 200
        settled = await money.owner.settlement(job_key(job.job_id))
        assert settled is not None and settled.tx_hash == status.settle_tx
        cost = status.results_paid * spec.price_per_calculation
        assert settled.cost == cost > 0
        assert status.spent == format_amount(cost + cost * MARGIN_PERCENT // 100)
        assert settled.refund == endless.budget - settled.cost - settled.cost // 10
        assert await money.owner.balance_of(address) == (
            balance_before - endless.budget + settled.refund)
        model = await job.result()  # the weights it reached
        assert model(torch.zeros(2, 1, 8, 8, dtype=torch.uint8)).shape == (2, 10)
        assert (await client.job(job.job_id[:10])).job_id == job.job_id  # a unique prefix

        # Refusals come back as one clear error each; the node keeps serving.
        with pytest.raises(ValueError, match="already ended"):
            await job.cancel()
        with pytest.raises(ValueError, match="no job"):
            await client.job("00ff")
        broke = dataclasses.replace(spec, budget=parse_amount("budget", "100000"))
        with pytest.raises(ClientError, match="not submitted"):
            await client.submit(broke)
        with pytest.raises(ValueError, match="spec"):
            await client.request({"op": "submit", "spec": {"name": "x"}})
        assert [row.job_id for row in await client.jobs()] == [job.job_id]


async def test_a_failed_job_has_no_result_and_a_missing_node_is_named(tmp_path: Path) -> None:
    client = AsyncClient(tmp_path / "nobody", start_node=False)
    with pytest.raises(Exception, match="no node is running"):
        await client.connect()
    status_dir = tmp_path / "lost"
    (status_dir / "results" / ("ab" * 32)).mkdir(parents=True)
    requester_dir = status_dir
    # A status saved by a run that stopped while the job ran reads back as lost.
    (requester_dir / "results" / ("ab" * 32) / "status.json").write_text(
        '{"job_id": "' + "ab" * 32 + '", "created_ms": 1, "name": "x", "model": "mlp", '
        '"state": "running", '
        '"master": "m", "round": 3, "max_rounds": 9, "accuracy": null, "loss": null, '
        '"evaluated_round": null, "calculations_accepted": 6, "results_paid": 18, '
        '"results_rejected": null, "verified_per_s": 1.0, "paid": false, "spent": null, '
        '"budget": "1", "elapsed_s": 6.0, "failovers": 0, "reason": "", "settle_tx": "", '
        '"model_file": null}'
    )
    async with start_devnet(1, masters=1, requester_dir=requester_dir):
        client = AsyncClient(requester_dir, start_node=False)
        job = await client.job("abab")
        status = await job.status()
        assert status.state == "lost" and "stopped while the job ran" in status.reason
        with pytest.raises(JobFailed, match="without weights"):
            await job.result(timeout=5)
