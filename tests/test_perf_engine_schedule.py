"""perf.engine's provider schedule: each session's transcripts and responses at a phase of its own (pure)."""
from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from perf.engine import extra_phase, next_due

periods = st.integers(min_value=0, max_value=500)


@given(st.integers(min_value=0, max_value=10**6), periods)
def test_a_phase_lies_inside_its_period(number: int, every: int) -> None:
    shift = extra_phase(number, every)
    assert shift == 0 if every == 0 else 0 <= shift < every


@given(st.lists(st.tuples(periods, st.integers(min_value=0, max_value=499)), max_size=3),
       st.integers(min_value=0, max_value=10**5))
def test_the_next_due_count_is_the_first_one_after_n(raw: list[tuple[int, int]], n: int) -> None:
    extras = tuple((every, shift % every if every else 0) for every, shift in raw)

    def due(m: int) -> bool:
        return any(every and (m + shift) % every == 0 for every, shift in extras)

    nxt = next_due(extras, n)
    if not any(every for every, _ in extras):
        assert nxt == 1 << 62
        return
    assert nxt > n and due(nxt)
    assert not any(due(m) for m in range(n + 1, nxt))


def test_sessions_that_start_together_spread_their_responses_over_the_period() -> None:
    # 150 sessions, a response every 150 appends (3 s at 50/s): in lockstep all 150 would fall in
    # the same append; spread, no stretch of 20 appends (0.4 s) holds more than twice its share.
    shifts = [extra_phase(k, 150) for k in range(150)]
    per_window = Counter(s // 20 for s in shifts)
    assert max(per_window.values()) <= 2 * 20
    assert max(Counter(shifts).values()) <= 2
