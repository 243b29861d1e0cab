"""ETA: the EWMA of service times, the wait estimate (hand-made cases with skills,
busy, opening and closing counters; against a plain reference replay and closed
forms with hypothesis), and the band shown to customers."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from selfserve.queueing.eta import (
    BAND_SPREAD,
    CLIP_HIGH,
    CLIP_LOW,
    AheadTicket,
    CounterState,
    ServiceTimeModel,
    estimate_wait,
    estimate_waits,
    eta_band,
    format_band,
    newcomer_waits,
    remaining_service_s,
    update_ewma,
)

MIN = 60.0
EXPECTED = {1: 3 * MIN, 2: 10 * MIN, 3: 20 * MIN}


def tickets(*service_ids: int) -> list[AheadTicket]:
    return [AheadTicket(s) for s in service_ids]


def counter(
    *services: int,
    busy: float = 0.0,
    opens_in: float = 0.0,
    closes_in: float | None = None,
) -> CounterState:
    return CounterState(frozenset(services), busy, opens_in, closes_in)


# --- EWMA --------------------------------------------------------------------------


def test_no_history_starts_from_the_configured_duration() -> None:
    assert update_ewma(None, 400, seed_s=300, alpha=0.5) == 350
    assert update_ewma(None, 300, seed_s=300, alpha=0.1) == 300


def test_history_moves_by_alpha_towards_the_observation() -> None:
    assert update_ewma(200, 300, seed_s=600, alpha=0.1) == pytest.approx(210)
    assert update_ewma(200, 100, seed_s=600, alpha=0.25) == pytest.approx(175)
    assert update_ewma(200, 150, seed_s=600, alpha=1.0) == 150


def test_outliers_are_clipped_to_a_band_around_the_estimate() -> None:
    # left open over lunch: counts as 5 x the estimate, not 60 x
    assert update_ewma(100, 6000, seed_s=100, alpha=0.5) == pytest.approx(
        100 + 0.5 * (CLIP_HIGH * 100 - 100)
    )
    # finished by mistake at once: counts as 0.2 x the estimate
    assert update_ewma(100, 0, seed_s=100, alpha=0.5) == pytest.approx(
        100 + 0.5 * (CLIP_LOW * 100 - 100)
    )
    assert update_ewma(100, 499, seed_s=100, alpha=1.0) == 499  # inside the band: as is
    assert update_ewma(None, 0, seed_s=300, alpha=1.0) == pytest.approx(60)  # seed is the base


def test_a_real_change_of_pace_comes_through_in_tens_of_tickets() -> None:
    estimate: float | None = None
    for n in range(1, 61):
        estimate = update_ewma(estimate, 120, seed_s=600, alpha=0.1)
        if n == 7:
            assert estimate < 360  # half of the gap closed within 7 tickets
    assert estimate == pytest.approx(120, rel=0.01)


@pytest.mark.parametrize(
    ("previous", "observed", "seed", "alpha"),
    [
        (None, 60, 300, 0.0),
        (None, 60, 300, 1.5),
        (None, 60, 0, 0.1),
        (None, -1, 300, 0.1),
        (None, math.nan, 300, 0.1),
        (None, math.inf, 300, 0.1),
        (0.0, 60, 300, 0.1),
        (math.nan, 60, 300, 0.1),
    ],
)
def test_ewma_rejects_nonsense(
    previous: float | None, observed: float, seed: float, alpha: float
) -> None:
    with pytest.raises(ValueError):  # noqa: PT011
        update_ewma(previous, observed, seed, alpha)


positive = st.floats(1, 10_000, allow_nan=False)


@settings(max_examples=300, deadline=None)
@given(st.none() | positive, st.floats(0, 100_000), positive, st.floats(0.01, 1))
def test_ewma_lands_between_the_estimate_and_the_clipped_observation(
    previous: float | None, observed: float, seed: float, alpha: float
) -> None:
    current = seed if previous is None else previous
    clipped = min(max(observed, CLIP_LOW * current), CLIP_HIGH * current)
    updated = update_ewma(previous, observed, seed, alpha)
    assert updated > 0
    assert min(current, clipped) - 1e-9 <= updated <= max(current, clipped) + 1e-9


def test_service_time_model_is_immutable_and_seeded() -> None:
    model = ServiceTimeModel({1: 300.0, 2: 600.0}, alpha=0.5)
    assert model.expected(1) == 300
    assert model.expected_all() == {1: 300, 2: 600}
    later = model.observe(1, 100).observe(1, 100)
    assert model.expected(1) == 300  # unchanged
    assert later.expected(1) == pytest.approx(150)  # 300 -> 200 -> 150
    assert later.expected(2) == 600
    with pytest.raises(KeyError):
        model.observe(9, 100)


def test_remaining_service_time_of_a_busy_counter() -> None:
    assert remaining_service_s(600, 0) == 600
    assert remaining_service_s(600, 200) == 400
    assert remaining_service_s(600, 590) == 150  # overrun soon: still a quarter to go
    assert remaining_service_s(600, 5000) == 150
    assert remaining_service_s(600, -10) == 600  # clock skew: treated as just started


# --- the wait: hand-made cases ---------------------------------------------------------


def test_an_idle_counter_and_nobody_ahead_means_no_wait() -> None:
    assert estimate_wait([], EXPECTED, [counter(1)], 1) == 0


def test_nobody_ahead_waits_for_the_first_able_counter_to_free_up() -> None:
    counters = [counter(1, busy=400), counter(1, 2, busy=250), counter(2, busy=10)]
    assert estimate_wait([], EXPECTED, counters, 1) == 250


def test_position_is_weighted_by_expected_service_time() -> None:
    assert estimate_wait(tickets(1, 1, 1), EXPECTED, [counter(1)], 1) == 9 * MIN
    assert estimate_wait(tickets(2, 2, 2), EXPECTED, [counter(1, 2)], 1) == 30 * MIN


def test_work_is_shared_over_the_open_counters() -> None:
    # 4 tickets, 2 counters: two rounds of 3 minutes before ours
    assert estimate_wait(tickets(1, 1, 1, 1), EXPECTED, [counter(1), counter(1)], 1) == 6 * MIN
    # 5 tickets: the fifth takes one counter for a third round, ours gets the other
    assert estimate_wait(tickets(1, 1, 1, 1, 1), EXPECTED, [counter(1), counter(1)], 1) == 6 * MIN


def test_only_counters_able_to_serve_the_ticket_count() -> None:
    counters = [counter(1), counter(2)]
    assert estimate_wait(tickets(2, 2, 2), EXPECTED, counters, 1) == 0
    assert estimate_wait(tickets(2, 2, 2), EXPECTED, counters, 2) == 30 * MIN


def test_other_services_delay_us_only_on_counters_we_share() -> None:
    # A {1} is busy for 100 s; B {1, 2} is idle. B takes the cash ticket ahead
    # (the oldest it can serve), A comes free at 100 s and takes ours: the
    # accounts ticket ahead of us cannot use A and does not delay us.
    counters = [counter(1, busy=100), counter(1, 2)]
    assert estimate_wait(tickets(1, 2), EXPECTED, counters, 1) == 100
    # for an accounts ticket only B counts: cash (3 min), then accounts (10 min)
    assert estimate_wait(tickets(1, 2), EXPECTED, counters, 2) == 13 * MIN


def test_tickets_nobody_open_can_serve_block_no_one() -> None:
    assert estimate_wait(tickets(3, 3, 3), EXPECTED, [counter(1)], 1) == 0


def test_no_counter_able_to_serve_it_means_unknown() -> None:
    assert estimate_wait([], EXPECTED, [], 1) is None
    assert estimate_wait(tickets(1), EXPECTED, [counter(2), counter(3)], 1) is None


def test_a_counter_that_opens_later_counts_from_its_opening() -> None:
    assert estimate_wait([], EXPECTED, [counter(1, opens_in=20 * MIN)], 1) == 20 * MIN
    counters = [counter(1, busy=30 * MIN), counter(1, opens_in=5 * MIN)]
    assert estimate_wait(tickets(1), EXPECTED, counters, 1) == 8 * MIN


def test_a_counter_that_closes_takes_no_ticket_after_that() -> None:
    closing = counter(1, closes_in=5 * MIN)  # takes two 3-minute tickets, then goes
    assert estimate_wait(tickets(1, 1), EXPECTED, [closing], 1) is None
    assert estimate_wait(tickets(1), EXPECTED, [closing], 1) == 3 * MIN
    later = counter(1, opens_in=30 * MIN)  # back from a break
    assert estimate_wait(tickets(1, 1), EXPECTED, [closing, later], 1) == 30 * MIN
    assert estimate_wait(tickets(1, 1), EXPECTED, [closing, counter(2, 1)], 1) == 3 * MIN


def test_the_expected_time_of_each_service_ahead_is_required() -> None:
    with pytest.raises(ValueError, match="service 7"):
        estimate_wait(tickets(1, 7), EXPECTED, [counter(1)], 1)
    # ours need not be known: its own length does not delay it
    assert estimate_wait(tickets(1), EXPECTED, [counter(1, 8)], 8) == 3 * MIN


def test_hundreds_of_tickets_ahead() -> None:
    ahead = tickets(*([1, 2, 3, 1, 1] * 100))
    counters = [counter(1, 2), counter(1), counter(2, 3), counter(1, 2, 3), counter(3)]
    wait = estimate_wait(ahead, EXPECTED, counters, 2)
    assert wait == reference_wait(ahead, EXPECTED, counters, 2)
    assert wait is not None
    assert wait > 0


# --- the wait: properties ---------------------------------------------------------------


def reference_wait(
    ahead: Sequence[AheadTicket],
    expected: Mapping[int, float],
    counters: Sequence[CounterState],
    target: int,
) -> float | None:
    """The same policy written the plain way: a list scan per call."""
    pending = [t.service_id for t in ahead] + [target]
    ours = len(pending) - 1
    taken = [False] * len(pending)
    free = [(max(c.busy_remaining_s, c.opens_in_s, 0.0), n) for n, c in enumerate(counters)]
    while free:
        free.sort()
        at, n = free.pop(0)
        c = counters[n]
        if c.closes_in_s is not None and at >= c.closes_in_s:
            continue
        pick = next(
            (i for i, s in enumerate(pending) if not taken[i] and s in c.services),
            None,
        )
        if pick is None:
            continue
        if pick == ours:
            return at
        taken[pick] = True
        free.append((at + expected[pending[pick]], n))
    return None


services = st.integers(1, 4)
durations = st.fixed_dictionaries({s: st.integers(1, 3600).map(float) for s in range(1, 5)})
counter_states = st.builds(
    CounterState,
    st.frozensets(services, min_size=1),
    st.integers(0, 3000).map(float),
    (st.integers(0, 1) | st.integers(0, 3000)).map(float),
    st.none() | st.integers(0, 6000).map(float),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(services.map(AheadTicket), max_size=30),
    durations,
    st.lists(counter_states, max_size=5),
    services,
)
def test_the_estimate_matches_a_plain_replay_of_the_policy(
    ahead: list[AheadTicket],
    expected: dict[int, float],
    counters: list[CounterState],
    target: int,
) -> None:
    assert estimate_wait(ahead, expected, counters, target) == reference_wait(
        ahead, expected, counters, target
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(services, max_size=40), durations, st.lists(counter_states, max_size=5), services)
def test_a_newcomers_wait_equals_the_replay_with_it_appended(
    ordered: list[int], expected: dict[int, float], counters: list[CounterState], service: int
) -> None:
    appended = estimate_waits([*ordered, service], expected, counters)[-1]
    assert newcomer_waits(ordered, expected, counters, [service]) == {service: appended}


@settings(max_examples=300, deadline=None)
@given(st.lists(services, max_size=40), durations, st.lists(counter_states, max_size=5))
def test_all_waits_at_once_equal_each_wait_on_its_own(
    ordered: list[int], expected: dict[int, float], counters: list[CounterState]
) -> None:
    assert estimate_waits(ordered, expected, counters) == [
        estimate_wait([AheadTicket(s) for s in ordered[:i]], expected, counters, service)
        for i, service in enumerate(ordered)
    ]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(services.map(AheadTicket), max_size=30),
    durations,
    st.frozensets(services, min_size=1),
    st.integers(0, 3000).map(float),
    services,
)
def test_one_counter_serves_everything_it_can_ahead_then_us(
    ahead: list[AheadTicket],
    expected: dict[int, float],
    skills: frozenset[int],
    busy: float,
    target: int,
) -> None:
    wait = estimate_wait(ahead, expected, [CounterState(skills, busy)], target)
    if target not in skills:
        assert wait is None
    else:
        assert wait == busy + sum(expected[t.service_id] for t in ahead if t.service_id in skills)


everyone = frozenset({1, 2, 3, 4})
busy_times = st.lists(st.integers(0, 3000).map(float), min_size=1, max_size=6)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(services.map(AheadTicket), max_size=30),
    durations,
    busy_times,
    services,
    st.integers(0, 30),
    services,
)
def test_more_work_ahead_never_shortens_the_wait(
    ahead: list[AheadTicket],
    expected: dict[int, float],
    busy: list[float],
    extra: int,
    where: int,
    target: int,
) -> None:
    """With counters that serve every service (with skills, FIFO list scheduling
    has anomalies: one more ticket can change which counter takes what)."""
    counters = [CounterState(everyone, b) for b in busy]
    more = [*ahead[:where], AheadTicket(extra), *ahead[where:]]
    before = estimate_wait(ahead, expected, counters, target)
    after = estimate_wait(more, expected, counters, target)
    assert before is not None
    assert after is not None
    assert after >= before
    slower = {**expected, extra: expected[extra] + 60}
    slowed = estimate_wait(ahead, slower, counters, target)
    assert slowed is not None
    assert slowed >= before


@settings(max_examples=300, deadline=None)
@given(
    st.lists(services.map(AheadTicket), max_size=30),
    durations,
    busy_times,
    st.integers(0, 3000).map(float),
    services,
)
def test_another_counter_never_lengthens_the_wait(
    ahead: list[AheadTicket],
    expected: dict[int, float],
    busy: list[float],
    extra_busy: float,
    target: int,
) -> None:
    counters = [CounterState(everyone, b) for b in busy]
    before = estimate_wait(ahead, expected, counters, target)
    after = estimate_wait(ahead, expected, [*counters, CounterState(everyone, extra_busy)], target)
    assert before is not None
    assert after is not None
    assert after <= before


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 200), st.integers(1, 8), st.integers(1, 3600).map(float))
def test_identical_idle_counters_take_whole_rounds(n: int, c: int, length: float) -> None:
    counters = [CounterState(everyone)] * c
    assert estimate_wait(tickets(*[1] * n), {1: length}, counters, 1) == (n // c) * length


# --- the band ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("minutes", "band"),
    [
        (0, (0, 5)),
        (-3, (0, 5)),
        (2.5, (0, 5)),
        (4.9, (0, 5)),
        (5, (5, 10)),
        (7.4, (5, 10)),
        (12, (10, 15)),
        (14.5, (10, 15)),
        (14.9, (10, 20)),
        (20, (15, 25)),
        (40, (30, 50)),
        (59.9, (50, 75)),
        (60, (50, 75)),
        (90, (75, 105)),
        (180, (150, 210)),
    ],
)
def test_band_edges(minutes: float, band: tuple[int, int]) -> None:
    assert eta_band(minutes * 60) == band


def test_band_rejects_infinity_and_nan() -> None:
    for value in (math.inf, math.nan):
        with pytest.raises(ValueError, match="finite"):
            eta_band(value)


@settings(max_examples=500, deadline=None)
@given(st.floats(0, 24 * 3600), st.floats(0, 24 * 3600))
def test_band_holds_the_estimate_and_grows_with_it(a: float, b: float) -> None:
    lo, hi = eta_band(a)
    assert 0 <= lo < hi
    assert lo * 60 <= a <= hi * 60
    assert lo % 5 == 0
    assert hi % 5 == 0
    assert hi - lo <= 2 * max(2.5, BAND_SPREAD * a / 60) + 15
    if a < 12.5 * 60:
        assert hi - lo == 5  # the plain cells 0–5, 5–10, 10–15
    small, large = sorted((a, b))
    assert eta_band(small)[0] <= eta_band(large)[0]
    assert eta_band(small)[1] <= eta_band(large)[1]


def test_format_band() -> None:
    assert format_band(10, 15, "en") == "10–15 min"
    assert format_band(10, 15, "zh-CN") == "10–15 分钟"
    assert format_band(0, 5, "fr") == "0–5 min"  # anything else: English
