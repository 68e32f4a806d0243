"""Checks of a devnet's money report shared by the economy and failover tests."""

from __future__ import annotations

from typing import Any

from consensus.settlement import settle
from ravenp2p.devnet import devnet_spec


def check_money(report: dict[str, Any]) -> None:
    """Payouts, fees and refund follow the payout rules to the wei and add up to the deposit."""
    spec_price = devnet_spec().price_per_calculation
    workers = {row["address"]: row for row in report["workers"]}
    assert set(report["payouts"]) <= set(workers)
    cost = 0
    for address, row in workers.items():
        expected = row["accepted"] * spec_price
        assert report["payouts"].get(address, 0) == expected, address
        cost += expected
        if row["byzantine"]:
            assert report["payouts"].get(address, 0) == 0
    assert cost == report["calculations_accepted"] * 3 * spec_price
    fees = report["fees"]
    assert fees["master"] == cost * 5 // 100
    assert fees["partner"] == 0  # no devnet node names a website partner
    assert fees["protocol"] == cost * 10 // 100 - fees["master"]
    assert report["refund"] == report["deposit"] - cost - cost * 10 // 100
    total = sum(report["payouts"].values()) + sum(fees.values()) + report["refund"]
    assert total == report["deposit"]
    # ... and exactly as consensus/settlement.py settles them.
    credits = {address: row["accepted"] for address, row in workers.items() if row["accepted"]}
    plan = settle(credits, spec_price, dict.fromkeys(credits), report["deposit"])
    assert {a: v for a, v in report["payouts"].items() if v} == dict(plan.worker_payouts)
    assert (fees["master"], fees["partner"], fees["protocol"], report["refund"]) == (
        plan.master_fee, plan.partner_total, plan.protocol_fee, plan.refund)
    assert report["settle_tx"].startswith("0x")
