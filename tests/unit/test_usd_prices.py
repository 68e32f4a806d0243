"""USD-priced jobs: the [payment] currency, quote checks, and the exact conversion to RAVEN.

No chain here: quotes are built as a feed would report them (the chain tests in
tests/chain/test_price_feed.py read real ones), so every rounding case and every
malformed answer can be stated with its exact figures.
"""

from __future__ import annotations

import math
from dataclasses import replace
from fractions import Fraction

import pytest

from ravenp2p.chain.base import Deployment, PriceQuote
from ravenp2p.chain.pricing import (
    MAX_PRICE_AGE_S,
    PriceRefused,
    check_quote,
    price_in_raven,
    usd_per_raven,
    usd_to_raven,
)
from ravenp2p.training.spec import RAVEN, JobSpec, JobSpecError, parse_job_spec

FEED = "0x" + "ab" * 20
NOW = 1_700_000_000
USD = 10**18  # spec USD amounts are integers of 10**-18 USD

SPEC_TOML = """
name = "usd-job"
model = "auto"
loss = "cross_entropy"
samples_per_calculation = 64
calculations_per_round = 2
redundancy = 3
[dataset]
source = "digits"
[optimizer]
name = "adam"
lr = 0.001
[stop]
max_rounds = 10
[payment]
{payment}
"""


def spec_with(payment: str) -> JobSpec:
    return parse_job_spec(SPEC_TOML.format(payment=payment))


def usd_spec(price: str = "0.002", budget: str = "0.15") -> JobSpec:
    """10 rounds x 2 calculations x 3 workers: 60 paid results at most."""
    return spec_with(f'currency = "USD"\nprice_per_calculation = "{price}"\nbudget = "{budget}"')


def quote(answer: int, decimals: int = 8, **fields: int) -> PriceQuote:
    """A fresh, complete round 7 answering `answer` (USD per RAVEN times 10**decimals)."""
    values = {"round_id": 7, "started_at": NOW - 10, "updated_at": NOW - 10,
              "answered_in_round": 7, **fields}
    return PriceQuote(feed=FEED, answer=answer, decimals=decimals, **values)


# ------------------------------------------------------------------ spec parsing


def test_a_usd_spec_keeps_its_usd_amounts_and_holds_no_raven_yet() -> None:
    spec = usd_spec("0.002", "0.15")
    assert spec.currency == "USD"
    assert spec.price_per_calculation_usd == 2 * USD // 1000
    assert spec.budget_usd == 15 * USD // 100
    assert (spec.price_per_calculation, spec.budget, spec.max_cost()) == (0, 0, 0)
    assert spec.to_dict()["payment"] == {
        "currency": "USD", "price_per_calculation": "0.002", "budget": "0.15",
    }
    assert JobSpec.from_dict(spec.to_dict()) == spec


def test_raven_stays_the_default_and_its_dict_has_no_currency() -> None:
    spec = spec_with('price_per_calculation = "0.001"\nbudget = "1"')
    explicit = spec_with('currency = "RAVEN"\nprice_per_calculation = "0.001"\nbudget = "1"')
    assert spec == explicit
    assert spec.currency == "RAVEN" and spec.price_per_calculation == RAVEN // 1000
    assert (spec.price_per_calculation_usd, spec.budget_usd) == (0, 0)
    assert "currency" not in spec.to_dict()["payment"]


@pytest.mark.parametrize("currency", ["EUR", "usd", "", 5])
def test_an_unknown_currency_is_named(currency: object) -> None:
    payment = {"currency": currency, "price_per_calculation": "1", "budget": "100"}
    data = {**spec_with('price_per_calculation = "1"\nbudget = "100"').to_dict(),
            "payment": payment}
    with pytest.raises(JobSpecError) as refused:
        JobSpec.from_dict(data)
    assert refused.value.field == "payment.currency"
    assert refused.value.reason == f"must be one of 'RAVEN', 'USD', got {currency!r}"


def test_usd_amounts_are_checked_like_raven_amounts_and_named_in_usd() -> None:
    cases = {
        ("0", "1"): ("payment.price_per_calculation", "must be more than 0 USD, got 0"),
        ("0.0000000000000000001", "1"): (
            "payment.price_per_calculation",
            "has more than 18 decimals: '0.0000000000000000001'",
        ),
        ("abc", "1"): (
            "payment.price_per_calculation",
            "must be a decimal number of USD such as \"0.001\", got 'abc'",
        ),
        ("0.002", "-1"): ("payment.budget", "must not be negative, got '-1'"),
        ("0.002", "0.13"): (
            "payment.budget",
            "0.13 USD does not cover the worst case of 0.132 USD (10 rounds x 2 calculations "
            "x 3 workers x 0.002 USD + 10% margin)",
        ),
    }
    for (price, budget), (field, reason) in cases.items():
        with pytest.raises(JobSpecError) as refused:
            usd_spec(price, budget)
        assert (refused.value.field, refused.value.reason) == (field, reason), (price, budget)
    assert usd_spec("0.002", "0.132").budget_usd == 132 * USD // 1000


# ------------------------------------------------------------------ quote checks


def test_a_fresh_positive_complete_answer_is_accepted() -> None:
    good = quote(50_000_000)
    assert check_quote(good, NOW) is good
    at_the_limit = quote(50_000_000, updated_at=NOW - MAX_PRICE_AGE_S)
    assert check_quote(at_the_limit, NOW) is at_the_limit
    assert check_quote(quote(1, answered_in_round=9), NOW).answer == 1


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"answer": 0}, "answer 0 is not a positive price"),
        ({"answer": -50_000_000}, "answer -50000000 is not a positive price"),
        ({"updated_at": 0}, "the round is not finished (updatedAt is 0)"),
        ({"answered_in_round": 6},
         "stale answer carried over from round 6 (answeredInRound < roundId)"),
        ({"updated_at": NOW + 1},
         f"updated at {NOW + 1}, after the chain's latest block ({NOW})"),
        ({"updated_at": NOW - MAX_PRICE_AGE_S - 1},
         f"stale answer, updated 3601 s ago (at {NOW - 3601}), more than the 3600 s allowed"),
    ],
)
def test_unusable_answers_are_refused_with_the_reason(fields: dict[str, int], reason: str) -> None:
    bad = replace(quote(50_000_000), **fields)
    with pytest.raises(PriceRefused) as refused:
        check_quote(bad, NOW)
    assert str(refused.value) == f"price feed {FEED} round 7: {reason}"


def test_the_maximum_age_is_configurable() -> None:
    minute_old = quote(50_000_000, updated_at=NOW - 60)
    assert check_quote(minute_old, NOW, max_age_s=60) is minute_old
    with pytest.raises(PriceRefused, match=r"updated 60 s ago .* more than the 59 s allowed"):
        check_quote(minute_old, NOW, max_age_s=59)
    for wrong in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="max_age_s must be a positive number of seconds"):
            check_quote(minute_old, NOW, max_age_s=wrong)  # type: ignore[arg-type]


# ------------------------------------------------------------------ conversion


def test_half_a_dollar_per_raven_doubles_the_figures_exactly() -> None:
    half = quote(50_000_000)  # 0.50 USD per RAVEN, 8 decimals
    assert usd_per_raven(half) == "0.5 USD per RAVEN"
    assert usd_to_raven(2 * USD // 1000, half) == 4 * RAVEN // 1000
    priced = price_in_raven(usd_spec("0.002", "0.15"), half)
    assert priced.currency == "RAVEN"
    assert (priced.price_per_calculation, priced.budget) == (4 * RAVEN // 1000, 3 * RAVEN // 10)
    assert (priced.price_per_calculation_usd, priced.budget_usd) == (0, 0)
    assert priced.to_dict()["payment"] == {"price_per_calculation": "0.004", "budget": "0.3"}


def test_the_price_rounds_down_and_the_budget_up() -> None:
    three = quote(300_000_000)  # 3 USD per RAVEN: a third of a RAVEN per dollar
    assert usd_to_raven(USD, three) == 333_333_333_333_333_333
    assert usd_to_raven(USD, three, round_up=True) == 333_333_333_333_333_334
    assert usd_to_raven(3 * USD, three, round_up=True) == RAVEN  # exact: nothing to round
    priced = price_in_raven(usd_spec("0.002", "0.14"), three)
    assert priced.price_per_calculation == 666_666_666_666_666
    assert priced.budget == 46_666_666_666_666_667
    assert priced.max_cost() == 43_999_999_999_999_956 <= priced.budget


def test_other_decimals_give_the_same_price() -> None:
    amount = 7 * USD // 1000
    for decimals in (1, 6, 8, 18, 30):
        half = quote(5 * 10 ** (decimals - 1), decimals)  # 0.5 USD per RAVEN
        assert usd_to_raven(amount, half) == 14 * RAVEN // 1000, decimals
    assert usd_to_raven(amount, quote(2, 0)) == 35 * RAVEN // 10_000  # 2 USD, no decimals


def test_a_budget_short_after_rounding_rises_to_the_worst_case() -> None:
    """Rounding the USD worst case down can leave the converted budget a unit short.

    61 results at one attodollar: the USD worst case of 67.1 rounds down to 67, which a
    budget of 67 covers. At 0.1 USD per RAVEN that budget is 670 base units, but the
    worst case at the converted price (10 base units) is 671: the budget rises to it.
    """
    spec = usd_spec("0.000000000000000001", "0.000000000000000066")
    odd = replace(spec, stop=replace(spec.stop, max_rounds=61), calculations_per_round=1,
                  redundancy=1, budget_usd=67)
    assert odd.max_cost(odd.price_per_calculation_usd) == 67
    tenth = quote(10_000_000)
    assert usd_to_raven(67, tenth, round_up=True) == 670
    priced = price_in_raven(odd, tenth)
    assert priced.price_per_calculation == 10
    assert priced.budget == priced.max_cost() == 671


def test_huge_and_tiny_prices() -> None:
    huge = quote(10**40)  # 10**32 USD per RAVEN
    assert usd_to_raven(2 * USD // 1000, huge) == 0
    with pytest.raises(PriceRefused) as refused:
        price_in_raven(usd_spec(), huge)
    assert str(refused.value) == (
        "payment.price_per_calculation: 0.002 USD is worth less than one RAVEN base unit at "
        "100000000000000000000000000000000 USD per RAVEN"
    )
    still_priced = quote(10**23)  # 10**15 USD per RAVEN: 0.002 USD is 2 base units
    assert price_in_raven(usd_spec(), still_priced).price_per_calculation == 2

    tiny = quote(1)  # 10**-8 USD per RAVEN
    assert usd_per_raven(tiny) == "0.00000001 USD per RAVEN"
    priced = price_in_raven(usd_spec("0.002", "0.2"), tiny)
    assert priced.price_per_calculation == 200_000 * RAVEN
    assert priced.budget == 20_000_000 * RAVEN
    with pytest.raises(PriceRefused) as refused:
        price_in_raven(usd_spec("0.002", "100000"), tiny)
    assert str(refused.value) == (
        "payment.budget: 100000 USD is 10000000000000 RAVEN at 0.00000001 USD per RAVEN, "
        "more than the 1000000000000 RAVEN a job may hold"
    )


def test_conversion_matches_exact_rational_arithmetic() -> None:
    """Against `Fraction` over a spread of awkward prices and decimals."""
    spec = usd_spec("0.0123456789", "1.23")
    for answer, decimals in [(1, 0), (7, 0), (123_456_789, 8), (10**18 + 1, 18), (3, 2)]:
        feed = quote(answer, decimals)
        rate = Fraction(answer, 10**decimals)  # USD per RAVEN
        price = Fraction(spec.price_per_calculation_usd, USD) / rate * RAVEN
        budget = Fraction(spec.budget_usd, USD) / rate * RAVEN
        priced = price_in_raven(spec, feed)
        assert priced.price_per_calculation == math.floor(price) > 0
        assert priced.budget == max(math.ceil(budget), priced.max_cost())
        assert priced.max_cost() <= priced.budget


def test_conversion_refuses_bad_input() -> None:
    with pytest.raises(PriceRefused, match="answer -1 is not positive"):
        usd_to_raven(USD, quote(-1))
    with pytest.raises(ValueError, match="a USD amount must be a non-negative integer, got -1"):
        usd_to_raven(-1, quote(50_000_000))
    raven = spec_with('price_per_calculation = "0.001"\nbudget = "1"')
    with pytest.raises(ValueError, match="priced in RAVEN, not USD: nothing to convert"):
        price_in_raven(raven, quote(50_000_000))
    with pytest.raises(ValueError, match="priced in RAVEN, not USD"):
        raven.in_raven(1, 1)


# ------------------------------------------------------------------ deployment files

ADDRESSES = {"token": "0x" + "11" * 20, "registry": "0x" + "22" * 20, "escrow": "0x" + "33" * 20}


def test_deployment_files_with_and_without_a_price_feed() -> None:
    old = Deployment.from_dict({"chain_id": 5, **ADDRESSES})
    assert old.price_feed is None and "price_feed" not in old.to_dict()
    new = Deployment.from_dict({"chain_id": 5, **ADDRESSES, "price_feed": FEED})
    assert new.price_feed == "0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB"
    assert Deployment.from_dict(new.to_dict()).price_feed == new.price_feed
    assert Deployment.from_dict({"chain_id": 5, **ADDRESSES, "price_feed": None}) == old
    # The feed prices jobs; it is not where their money lives, so manifests compare equal.
    assert new == old and hash(new) == hash(old)
    with pytest.raises(ValueError, match=r"deployment\.price_feed: "):
        Deployment.from_dict({"chain_id": 5, **ADDRESSES, "price_feed": "0x1234"})
