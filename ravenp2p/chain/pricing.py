"""USD prices turned into RAVEN at a price feed's rate (whitepaper section 4).

A job may state its price per calculation and its budget in USD. Its requester
converts them to RAVEN when it opens the escrow, at the latest answer of the
deployment's RAVEN/USD feed: any contract with Chainlink's
`AggregatorV3Interface` (the owner-set `PriceFeed` a devnet deploys, or a
market feed). The escrow, the masters and the workers only ever see RAVEN.

The arithmetic is exact on integers: the price per calculation rounds down
(the requester never pays a worker more than it offered), and the budget rounds
up and is raised to the worst-case cost at the converted price when rounding
left it short, so the escrow always accepts it. docs/economics.md ("USD
prices") states the rules.
"""

from __future__ import annotations

from decimal import Decimal

from ravenp2p.chain.base import Chain, ChainError, PriceQuote
from ravenp2p.training.spec import MAX_AMOUNT_RAVEN, RAVEN, JobSpec, format_amount

MAX_PRICE_AGE_S = 3600
"""How old (by the chain's clock) the feed's latest answer may be by default: an hour."""
USD_UNIT = 10**18
"""USD amounts in a job spec are integers of 10**-18 USD."""


class PriceRefused(ChainError):
    """A USD job cannot be priced in RAVEN; the message says why.

    The feed's answer is unusable (not positive, unfinished, carried over,
    stale), or it prices the job out of range (a price worth less than one base
    unit, a budget above what a spec may hold).
    """


def usd_per_raven(quote: PriceQuote) -> str:
    """The quote's price in words, e.g. ``"0.5 USD per RAVEN"`` (exact)."""
    price = Decimal(quote.answer).scaleb(-quote.decimals)
    return f"{price.normalize():f} USD per RAVEN"


def check_quote(quote: PriceQuote, now: int, max_age_s: int = MAX_PRICE_AGE_S) -> PriceQuote:
    """`quote` when it may price a job at chain time `now`, else `PriceRefused` saying why.

    Usable means: a positive answer, a finished round (`updatedAt` set) that
    answered itself or a later round (`answeredInRound >= roundId`, else the
    answer is carried over from an older round), updated no later than `now`
    and at most `max_age_s` seconds before it.
    """
    if isinstance(max_age_s, bool) or not isinstance(max_age_s, int) or max_age_s <= 0:
        raise ValueError(f"max_age_s must be a positive number of seconds, got {max_age_s!r}")
    feed = f"price feed {quote.feed} round {quote.round_id}"
    if quote.answer <= 0:
        raise PriceRefused(f"{feed}: answer {quote.answer} is not a positive price")
    if quote.updated_at == 0:
        raise PriceRefused(f"{feed}: the round is not finished (updatedAt is 0)")
    if quote.answered_in_round < quote.round_id:
        raise PriceRefused(
            f"{feed}: stale answer carried over from round {quote.answered_in_round} "
            "(answeredInRound < roundId)"
        )
    if quote.updated_at > now:
        raise PriceRefused(
            f"{feed}: updated at {quote.updated_at}, after the chain's latest block ({now})"
        )
    age = now - quote.updated_at
    if age > max_age_s:
        raise PriceRefused(
            f"{feed}: stale answer, updated {age} s ago (at {quote.updated_at}), more than "
            f"the {max_age_s} s allowed"
        )
    return quote


async def current_quote(chain: Chain, max_age_s: int = MAX_PRICE_AGE_S) -> PriceQuote:
    """The deployment's RAVEN/USD quote, checked against the chain's clock (`check_quote`)."""
    quote = await chain.raven_usd_price()
    # The clock is read after the quote, so a round mined in between is never "in the future".
    return check_quote(quote, await chain.now(), max_age_s)


def usd_to_raven(usd: int, quote: PriceQuote, *, round_up: bool = False) -> int:
    """RAVEN base units worth `usd` (units of 10**-18 USD) at the quote's price.

    ``usd * RAVEN * 10**decimals / (USD_UNIT * answer)``, rounded down, or up
    with `round_up`. The quote's answer must be positive.
    """
    if isinstance(usd, bool) or not isinstance(usd, int) or usd < 0:
        raise ValueError(f"a USD amount must be a non-negative integer, got {usd!r}")
    if quote.answer <= 0:
        raise PriceRefused(f"price feed {quote.feed}: answer {quote.answer} is not positive")
    scale: int = 10**quote.decimals
    whole, rest = divmod(usd * RAVEN * scale, USD_UNIT * quote.answer)
    return whole + 1 if round_up and rest else whole


def price_in_raven(spec: JobSpec, quote: PriceQuote) -> JobSpec:
    """The USD-priced `spec` priced in RAVEN at `quote` (checked beforehand: `check_quote`).

    The price per calculation rounds down; the budget rounds up, then rises to
    the worst-case cost at that price if rounding left it below. Raises
    `PriceRefused` when the price is worth less than one base unit, or the
    budget more than a spec may hold.
    """
    if spec.currency != "USD":
        raise ValueError(f"the spec is priced in {spec.currency}, not USD: nothing to convert")
    rate = usd_per_raven(quote)
    price = usd_to_raven(spec.price_per_calculation_usd, quote)
    if price == 0:
        raise PriceRefused(
            f"payment.price_per_calculation: {format_amount(spec.price_per_calculation_usd)} USD "
            f"is worth less than one RAVEN base unit at {rate}"
        )
    budget = max(usd_to_raven(spec.budget_usd, quote, round_up=True), spec.max_cost(price))
    if budget > MAX_AMOUNT_RAVEN * RAVEN:
        raise PriceRefused(
            f"payment.budget: {format_amount(spec.budget_usd)} USD is {format_amount(budget)} "
            f"RAVEN at {rate}, more than the {MAX_AMOUNT_RAVEN} RAVEN a job may hold"
        )
    return spec.in_raven(price, budget)
