"""Tests of cachesvc.core.ranges: table-driven cases per operation, then stateful
tests against a per-offset model over a small universe."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from cachesvc.core.ranges import MAX_OFFSET, Range, RangeSet, marker_set
from cachesvc.core.sets import CountPolicy, GenerationPolicy

V = TypeVar("V")
Seg = tuple[int, int, Any]

R = Range


class MemoryOffsetPolicy:
    """Values are the memory-file offset of a segment's first byte: segments merge
    iff the memory behind them is contiguous too."""

    def merge(self, left: Range, left_value: int, right: Range, right_value: int) -> int | None:
        return left_value if left_value + (left.end - left.start) == right_value else None

    def split(self, rng: Range, value: int, at: int) -> tuple[int, int]:
        return value, value + (at - rng.start)


def file_range_set() -> RangeSet[int]:
    """The generic set as FileRangeSet uses it: memory offsets."""
    return RangeSet(MemoryOffsetPolicy())


def dirty_set() -> RangeSet[int]:
    """The generic set as DirtySet uses it: write generations."""
    return RangeSet(GenerationPolicy())


def ref_count_set() -> RangeSet[int]:
    """The generic set as MappingSet uses it: counts."""
    return RangeSet(CountPolicy())


def build(segs: Sequence[Seg], factory: Callable[[], RangeSet[Any]] = ref_count_set) -> Any:
    """A set holding exactly ``segs`` (checked: the table must not merge by accident)."""
    s = factory()
    for start, end, value in segs:
        s.insert(Range(start, end), value)
    assert dump(s) == list(segs)
    s.check_invariants(require_merged=True)
    return s


def dump(s: RangeSet[V]) -> list[tuple[int, int, V]]:
    return [(rng.start, rng.end, value) for rng, value in s]


def check(s: RangeSet[V], expected: Sequence[tuple[int, int, V]]) -> None:
    assert dump(s) == list(expected)
    s.check_invariants()
    assert s.total_length == sum(end - start for start, end, _ in expected)
    assert len(s) == len(expected)
    assert bool(s) == bool(expected)


BASE = [(0, 10, 1), (20, 30, 2)]
ROWS = [(0, 10, 1), (10, 20, 2), (20, 30, 3), (40, 50, 4)]
MALFORMED = [R(5, 3), R(-1, 3), R(-5, -1), R(0, MAX_OFFSET + 1)]


# ------------------------------------------------------------------ Range


@pytest.mark.parametrize(
    ("a", "b", "overlaps", "intersect", "superset"),
    [
        (R(0, 10), R(5, 15), True, R(5, 10), False),
        (R(0, 10), R(10, 20), False, R(10, 10), False),
        (R(0, 10), R(2, 4), True, R(2, 4), True),
        (R(0, 10), R(0, 10), True, R(0, 10), True),
        (R(0, 10), R(5, 5), False, R(5, 5), True),
        (R(0, 10), R(20, 30), False, R(20, 20), False),
        (R(5, 5), R(0, 10), False, R(5, 5), False),
    ],
)
def test_range_relations(a: R, b: R, overlaps: bool, intersect: R, superset: bool) -> None:
    assert a.overlaps(b) is overlaps
    assert b.overlaps(a) is overlaps
    assert a.intersect(b) == intersect
    assert a.intersect(b).is_empty is not overlaps
    assert a.is_superset_of(b) is superset


def test_range_basics() -> None:
    r = R(3, 7)
    assert (r.length, r.is_empty, r.well_formed()) == (4, False, True)
    assert [r.contains(o) for o in (2, 3, 6, 7)] == [False, True, True, False]
    assert R(4, 4).is_empty and R(4, 4).length == 0
    assert str(r) == "[3, 7)"
    assert r == (3, 7)
    start, end = r
    assert (start, end) == (3, 7)
    assert R(0, MAX_OFFSET).well_formed()
    assert not any(bad.well_formed() for bad in MALFORMED)


# ------------------------------------------------------------------ queries


@pytest.mark.parametrize(
    ("offset", "expected"),
    [
        (0, (R(0, 10), 1)),
        (9, (R(0, 10), 1)),
        (10, None),
        (15, None),
        (20, (R(20, 30), 2)),
        (29, (R(20, 30), 2)),
        (30, None),
        (MAX_OFFSET, None),
    ],
)
def test_find(offset: int, expected: tuple[R, int] | None) -> None:
    assert build(BASE).find(offset) == expected


def test_find_in_empty_set() -> None:
    assert ref_count_set().find(0) is None


@pytest.mark.parametrize(
    ("segs", "offset", "expected"),
    [
        (BASE, 0, None),
        (BASE, 5, None),
        (BASE, 10, R(10, 20)),
        (BASE, 19, R(10, 20)),
        (BASE, 30, R(30, MAX_OFFSET)),
        (BASE, MAX_OFFSET - 1, R(30, MAX_OFFSET)),
        (BASE, MAX_OFFSET, None),
        ([(5, 10, 1)], 0, R(0, 5)),
        ([(5, 10, 1)], 4, R(0, 5)),
        ([], 7, R(0, MAX_OFFSET)),
    ],
)
def test_find_gap(segs: list[Seg], offset: int, expected: R | None) -> None:
    assert build(segs).find_gap(offset) == expected


@pytest.mark.parametrize(
    ("rng", "expected"),
    [
        (R(0, 0), []),
        (R(5, 5), []),
        (R(5, 6), [(0, 10, 1)]),
        (R(10, 20), []),
        (R(9, 21), BASE),
        (R(10, 21), [(20, 30, 2)]),
        (R(0, 100), BASE),
        (R(29, 30), [(20, 30, 2)]),
        (R(30, 40), []),
        (R(0, MAX_OFFSET), BASE),
    ],
)
def test_segments(rng: R, expected: list[Seg]) -> None:
    assert build(BASE).segments(rng) == [(R(s, e), v) for s, e, v in expected]


@pytest.mark.parametrize(
    ("rng", "expected"),
    [
        (R(0, 40), [R(10, 20), R(30, 40)]),
        (R(5, 25), [R(10, 20)]),
        (R(10, 20), [R(10, 20)]),
        (R(12, 15), [R(12, 15)]),
        (R(0, 10), []),
        (R(20, 30), []),
        (R(5, 5), []),
        (R(15, 15), []),
        (R(35, 50), [R(35, 50)]),
        (R(9, 21), [R(10, 20)]),
    ],
)
def test_gaps(rng: R, expected: list[R]) -> None:
    assert build(BASE).gaps(rng) == expected


def test_gaps_of_touching_segments_and_empty_set() -> None:
    s = build([(0, 10, 1), (10, 20, 2), (25, 30, 1)])
    assert s.gaps(R(0, 30)) == [R(20, 25)]
    assert ref_count_set().gaps(R(3, 9)) == [R(3, 9)]


FIRST_GAP_SEGS = [(0, 10, 1), (20, 30, 2), (32, 40, 3)]


@pytest.mark.parametrize(
    ("offset", "length", "alignment", "expected_start"),
    [
        (0, 1, 1, 10),
        (0, 10, 1, 10),
        (0, 11, 1, 40),
        (5, 1, 1, 10),
        (12, 3, 1, 12),
        (12, 8, 1, 12),
        (12, 9, 1, 40),
        (30, 2, 1, 30),
        (30, 3, 1, 40),
        (31, 1, 1, 31),
        (100, 1, 1, 100),
        (0, 4, 16, 16),
        (0, 5, 8, 40),  # 16 is too short, 24 and 32 are taken
        (0, 2, 3, 12),
        (11, 2, 4, 12),
        (0, 1, 64, 64),
        (0, 1, 21, 42),  # 21 lies in [20, 30), which starts before it
    ],
)
def test_first_gap_from(offset: int, length: int, alignment: int, expected_start: int) -> None:
    s = build(FIRST_GAP_SEGS)
    got = s.first_gap_from(offset, length, alignment)
    assert got == R(expected_start, expected_start + length)
    assert not s.segments(got)


def test_first_gap_from_empty_set() -> None:
    assert ref_count_set().first_gap_from(7, 3, 4) == R(8, 11)
    assert ref_count_set().first_gap_from(0, MAX_OFFSET) == R(0, MAX_OFFSET)


# ------------------------------------------------------------------ insert


@pytest.mark.parametrize(
    ("segs", "rng", "value", "returned", "expected"),
    [
        # Merge with both neighbours.
        ([(0, 10, 1), (20, 30, 1)], R(10, 20), 1, R(0, 30), [(0, 30, 1)]),
        # Left only: the right neighbour is not adjacent / has another value.
        ([(0, 10, 1), (20, 30, 1)], R(10, 15), 1, R(0, 15), [(0, 15, 1), (20, 30, 1)]),
        ([(0, 10, 1), (20, 30, 2)], R(10, 20), 1, R(0, 20), [(0, 20, 1), (20, 30, 2)]),
        # Right only.
        ([(0, 10, 1), (20, 30, 1)], R(15, 20), 1, R(15, 30), [(0, 10, 1), (15, 30, 1)]),
        ([(0, 10, 2), (20, 30, 1)], R(10, 20), 1, R(10, 30), [(0, 10, 2), (10, 30, 1)]),
        # No merge: not adjacent, or values differ.
        (
            [(0, 10, 1), (20, 30, 1)],
            R(12, 18),
            1,
            R(12, 18),
            [(0, 10, 1), (12, 18, 1), (20, 30, 1)],
        ),
        (
            [(0, 10, 1), (20, 30, 1)],
            R(10, 20),
            2,
            R(10, 20),
            [(0, 10, 1), (10, 20, 2), (20, 30, 1)],
        ),
        # Into an empty set, at the very end of the offset space.
        ([], R(3, 4), 5, R(3, 4), [(3, 4, 5)]),
        ([], R(MAX_OFFSET - 1, MAX_OFFSET), 5, R(MAX_OFFSET - 1, MAX_OFFSET), None),
    ],
)
def test_insert(
    segs: list[Seg], rng: R, value: int, returned: R, expected: list[Seg] | None
) -> None:
    s = build(segs)
    assert s.insert(rng, value) == returned
    check(s, expected if expected is not None else [(*rng, value)])
    s.check_invariants(require_merged=True)


@pytest.mark.parametrize(
    ("segs", "rng", "value", "expected"),
    [
        ([(0, 10, 100)], R(10, 20), 110, [(0, 20, 100)]),
        ([(0, 10, 100)], R(10, 20), 111, [(0, 10, 100), (10, 20, 111)]),
        ([(20, 30, 200)], R(10, 20), 190, [(10, 30, 190)]),
        ([(20, 30, 200)], R(10, 20), 200, [(10, 20, 200), (20, 30, 200)]),
        ([(0, 10, 100), (20, 30, 120)], R(10, 20), 110, [(0, 30, 100)]),
    ],
)
def test_insert_file_ranges_merge_iff_memory_is_contiguous(
    segs: list[Seg], rng: R, value: int, expected: list[Seg]
) -> None:
    s = build(segs, file_range_set)
    s.insert(rng, value)
    check(s, expected)


@pytest.mark.parametrize(
    ("left", "right", "expected"),
    [(3, 5, [(0, 20, 5)]), (7, 2, [(0, 20, 7)]), (3, 3, [(0, 20, 3)])],
)
def test_dirty_ranges_always_merge_keeping_the_newest_generation(
    left: int, right: int, expected: list[Seg]
) -> None:
    s = dirty_set()
    s.insert(R(0, 10), left)
    s.insert(R(10, 20), right)
    check(s, expected)


def test_marker_set_always_merges_and_splits() -> None:
    s = marker_set()
    for rng in (R(0, 10), R(20, 30), R(10, 20)):
        s.insert(rng, None)
    check(s, [(0, 30, None)])
    s.isolate(R(5, 25))
    check(s, [(0, 5, None), (5, 25, None), (25, 30, None)])
    with pytest.raises(AssertionError, match="mergeable"):
        s.check_invariants(require_merged=True)
    s.merge_adjacent(R(5, 25))
    check(s, [(0, 30, None)])
    assert repr(s) == "RangeSet([0, 30))"


@pytest.mark.parametrize(
    "rng", [R(5, 15), R(15, 25), R(0, 10), R(25, 30), R(0, 30), R(2, 3), R(9, 21), R(3, 3)]
)
def test_insert_rejects_overlap_and_empty(rng: R) -> None:
    s = build(BASE)
    with pytest.raises(ValueError):
        s.insert(rng, 1)
    check(s, BASE)


# ------------------------------------------------------------------ isolate, remove


FILE_BASE = [(0, 10, 100), (20, 30, 200)]


@pytest.mark.parametrize(
    ("rng", "expected"),
    [
        (R(5, 25), [(0, 5, 100), (5, 10, 105), (20, 25, 200), (25, 30, 205)]),
        (R(2, 8), [(0, 2, 100), (2, 8, 102), (8, 10, 108), (20, 30, 200)]),
        (R(10, 20), FILE_BASE),
        (R(0, 30), FILE_BASE),
        (R(5, 5), FILE_BASE),
        (R(25, MAX_OFFSET), [(0, 10, 100), (20, 25, 200), (25, 30, 205)]),
    ],
)
def test_isolate_splits_through_policy(rng: R, expected: list[Seg]) -> None:
    s = build(FILE_BASE, file_range_set)
    s.isolate(rng)
    check(s, expected)
    s.merge_adjacent(R(0, MAX_OFFSET))
    check(s, FILE_BASE)


@pytest.mark.parametrize(
    ("rng", "removed", "left"),
    [
        (
            R(5, 45),
            [(5, 10, 1), (10, 20, 2), (20, 30, 3), (40, 45, 4)],
            [(0, 5, 1), (45, 50, 4)],
        ),
        (R(10, 30), [(10, 20, 2), (20, 30, 3)], [(0, 10, 1), (40, 50, 4)]),
        (R(30, 40), [], ROWS),
        (R(0, 100), ROWS, []),
        (
            R(12, 15),
            [(12, 15, 2)],
            [(0, 10, 1), (10, 12, 2), (15, 20, 2), (20, 30, 3), (40, 50, 4)],
        ),
        (R(7, 7), [], ROWS),
        (R(49, MAX_OFFSET), [(49, 50, 4)], [*ROWS[:3], (40, 49, 4)]),
    ],
)
def test_remove(rng: R, removed: list[Seg], left: list[Seg]) -> None:
    s = build(ROWS)
    assert s.remove(rng) == [(R(a, b), v) for a, b, v in removed]
    check(s, left)
    s.check_invariants(require_merged=True)


def test_remove_splits_values_through_policy() -> None:
    s = build([(0, 20, 100)], file_range_set)
    assert s.remove(R(5, 15)) == [(R(5, 15), 105)]
    check(s, [(0, 5, 100), (15, 20, 115)])


# ------------------------------------------------------------------ update, apply


UPDATE_BASE = [(0, 10, 1), (10, 20, 2), (30, 40, 1)]


def recorder(fn: Callable[[int], int]) -> tuple[list[R], Callable[[R, int], int]]:
    calls: list[R] = []

    def apply(rng: R, value: int) -> int:
        calls.append(rng)
        return fn(value)

    return calls, apply


@pytest.mark.parametrize(
    ("rng", "calls", "expected"),
    [
        (R(0, 40), [R(0, 10), R(10, 20), R(30, 40)], [(0, 10, 2), (10, 20, 3), (30, 40, 2)]),
        (
            R(5, 35),
            [R(5, 10), R(10, 20), R(30, 35)],
            [(0, 5, 1), (5, 10, 2), (10, 20, 3), (30, 35, 2), (35, 40, 1)],
        ),
        # Merges with the neighbour just outside the range.
        (R(0, 10), [R(0, 10)], [(0, 20, 2), (30, 40, 1)]),
        (R(20, 30), [], UPDATE_BASE),
        (R(15, 15), [], UPDATE_BASE),
    ],
)
def test_update(rng: R, calls: list[R], expected: list[Seg]) -> None:
    s = build(UPDATE_BASE)
    seen, fn = recorder(lambda v: v + 1)
    s.update(rng, fn)
    assert seen == calls
    check(s, expected)
    s.check_invariants(require_merged=True)


def failing_after(n: int) -> Callable[[R, int], int]:
    count = 0

    def fn(_rng: R, value: int) -> int:
        nonlocal count
        count += 1
        if count > n:
            raise KeyError("boom")
        return value + 1

    return fn


@pytest.mark.parametrize("rng", [R(5, 15), R(5, 35), R(0, 40)])
@pytest.mark.parametrize("n", [0, 1])
def test_raising_fn_leaves_the_set_valid_and_merged(rng: R, n: int) -> None:
    s = build(UPDATE_BASE)
    with pytest.raises(KeyError):
        s.update(rng, failing_after(n))
    s.check_invariants(require_merged=True)
    if n == 0:
        check(s, UPDATE_BASE)
    else:
        # The first piece was updated (and merged with [10, 20) -> 2), the rest kept
        # its values.
        head = [(0, 5, 1)] if rng.start == 5 else []
        check(s, [*head, (rng.start, 20, 2), (30, 40, 1)])


# ------------------------------------------------------------------ merge_adjacent, clear


@pytest.mark.parametrize(
    ("rng", "expected"),
    [
        (R(10, 20), [(0, 30, 1)]),
        (R(0, 30), [(0, 30, 1)]),
        (R(0, MAX_OFFSET), [(0, 30, 1)]),
        (R(12, 15), [(0, 10, 1), (10, 20, 1), (20, 30, 1)]),
        (R(0, 5), [(0, 10, 1), (10, 20, 1), (20, 30, 1)]),
        (R(10, 10), [(0, 20, 1), (20, 30, 1)]),
        (R(0, 10), [(0, 20, 1), (20, 30, 1)]),
        (R(20, 25), [(0, 10, 1), (10, 30, 1)]),
        (R(30, 40), [(0, 10, 1), (10, 20, 1), (20, 30, 1)]),
    ],
)
def test_merge_adjacent(rng: R, expected: list[Seg]) -> None:
    s = build([(0, 30, 1)])
    s.isolate(R(10, 20))
    check(s, [(0, 10, 1), (10, 20, 1), (20, 30, 1)])
    s.merge_adjacent(rng)
    check(s, expected)


def test_merge_adjacent_respects_policy() -> None:
    s = build([(0, 10, 1), (10, 20, 2), (20, 30, 1)])
    s.merge_adjacent(R(0, 30))
    check(s, [(0, 10, 1), (10, 20, 2), (20, 30, 1)])


def test_clear() -> None:
    s = build(ROWS)
    s.clear()
    check(s, [])
    assert s.find(5) is None
    assert s.find_gap(5) == R(0, MAX_OFFSET)
    s.insert(R(5, 6), 1)
    check(s, [(5, 6, 1)])


# ------------------------------------------------------------------ errors, checks, repr


@pytest.mark.parametrize("bad", MALFORMED)
@pytest.mark.parametrize(
    "op",
    [
        lambda s, r: s.segments(r),
        lambda s, r: s.gaps(r),
        lambda s, r: s.insert(r, 1),
        lambda s, r: s.isolate(r),
        lambda s, r: s.remove(r),
        lambda s, r: s.update(r, lambda _r, v: v),
        lambda s, r: s.merge_adjacent(r),
    ],
)
def test_malformed_ranges_are_rejected(bad: R, op: Callable[[RangeSet[int], R], object]) -> None:
    s = build(BASE)
    with pytest.raises(ValueError, match="malformed"):
        op(s, bad)
    check(s, BASE)


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.find(-1),
        lambda s: s.find_gap(-1),
        lambda s: s.first_gap_from(-1, 1),
        lambda s: s.first_gap_from(0, 0),
        lambda s: s.first_gap_from(0, 1, 0),
        lambda s: s.first_gap_from(MAX_OFFSET - 1, 2),
        lambda s: s.first_gap_from(30, MAX_OFFSET - 29),
    ],
)
def test_bad_offsets_are_rejected(call: Callable[[RangeSet[int]], object]) -> None:
    with pytest.raises(ValueError):
        call(build(BASE))


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda m: m.__setitem__(5, (5, 9)), "bad segment"),
        (lambda m: m.__setitem__(5, (3, 9)), "bad segment"),
        (lambda m: m.__setitem__(5, (15, 9)), "overlaps"),
        (lambda m: m.__setitem__(10, (12, 9)), "total_length"),
        (lambda m: m.__setitem__(0, (22, 1)), "overlaps"),
    ],
)
def test_check_invariants_detects_corruption(corrupt: Callable[[Any], None], message: str) -> None:
    s = build(BASE)
    corrupt(s._map)
    with pytest.raises(AssertionError, match=message):
        s.check_invariants()


def test_check_invariants_require_merged() -> None:
    s = build([(0, 10, 1), (10, 20, 2)])
    s.check_invariants(require_merged=True)
    s.update(R(10, 20), lambda _r, _v: 1)  # merges
    s.isolate(R(5, 20))
    s.check_invariants()
    with pytest.raises(AssertionError, match=r"\[0, 5\) and \[5, 20\) are mergeable"):
        s.check_invariants(require_merged=True)


def test_repr() -> None:
    assert repr(build([(0, 4096, 7), (8192, 12288, 9)])) == (
        "RangeSet([0, 4096)=7, [8192, 12288)=9)"
    )
    assert repr(ref_count_set()) == "RangeSet()"
    assert repr(build([(0, 1, (1, 2))], ref_count_set)) == "RangeSet([0, 1)=(1, 2))"
    big = build([(2 * i, 2 * i + 1, i) for i in range(40)])
    text = repr(big)
    assert text.startswith("RangeSet([0, 1)=0, [2, 3)=1,")
    assert text.endswith("[62, 63)=31, ... 8 more)")


# ------------------------------------------------------------------ sublists


def small_sublists(s: RangeSet[V]) -> RangeSet[V]:
    """``s`` with its SortedList's load set to 4, so that even a few dozen segments
    spread over many sublists and RangeSet's sublist walks cross their borders."""
    s._map._reset(4)
    return s


@settings(max_examples=150, deadline=None)
@given(
    starts=st.lists(st.integers(0, 200), unique=True, max_size=60),
    probes=st.lists(st.integers(-1, 202), min_size=1, max_size=10),
)
def test_neighbour_lookups_across_sublists(starts: list[int], probes: list[int]) -> None:
    s = small_sublists(ref_count_set())
    for start in starts:
        s.insert(R(start, start + 1), start)  # distinct values: nothing merges
    keys = sorted(starts)
    assert s._starts(0, MAX_OFFSET) == keys
    for probe in probes:
        assert s._floor(probe) == max((k for k in keys if k <= probe), default=-1)
        assert s._after(probe) == min((k for k in keys if k > probe), default=-1)
        for hi in (probe, probe + 1, probe + 17, probe + 90):
            assert s._starts(max(probe, 0), hi) == [k for k in keys if probe <= k < hi]
    s.check_invariants(require_merged=True)
    for start in keys[::2]:
        s.remove(R(start, start + 1))
    assert s._starts(0, MAX_OFFSET) == keys[1::2]
    s.check_invariants(require_merged=True)


# ------------------------------------------------------------------ stateful

N = 64  # the universe [0, N) of the stateful tests
ranges = st.tuples(st.integers(0, N), st.integers(0, N)).map(lambda t: R(min(t), max(t)))
offsets = st.integers(0, N)
STATEFUL = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def runs(offsets: Sequence[int]) -> list[R]:
    """Maximal runs of consecutive offsets, ascending (``offsets`` sorted)."""
    out: list[R] = []
    for o in offsets:
        if out and out[-1].end == o:
            out[-1] = R(out[-1].start, o + 1)
        else:
            out.append(R(o, o + 1))
    return out


class ModelMachine(RuleBasedStateMachine, Generic[V]):
    """A RangeSet against a per-offset model over [0, N).

    ``cuts`` holds the points where ``isolate`` left two mergeable segments
    apart (and no operation merged around them since): the set must have
    exactly those unmerged mergeable neighbours, which pins its segmentation
    down completely.
    """

    def __init__(self) -> None:
        super().__init__()
        self.set: RangeSet[V] = small_sublists(self.make())
        self.model: dict[int, V] = {}
        self.cuts: set[int] = set()

    # What the subclasses define.
    def make(self) -> RangeSet[V]:
        raise NotImplementedError

    def value_at(self, seg: R, value: V, offset: int) -> V:
        """The model's value at ``offset`` of segment ``seg`` -> ``value``."""
        raise NotImplementedError

    def mergeable(self, left: V, right: V) -> bool:
        """Whether the model values of offsets o and o + 1 belong in one segment."""
        raise NotImplementedError

    def change(self, value: V, k: int) -> V:
        raise NotImplementedError

    # Model helpers.
    def free_runs(self, rng: R) -> list[R]:
        return runs([o for o in range(rng.start, rng.end) if o not in self.model])

    def drop_cuts(self, lo: int, hi: int) -> None:
        self.cuts = {c for c in self.cuts if not lo <= c <= hi}

    def model_apply(self, rng: R, k: int) -> None:
        for o in range(rng.start, rng.end):
            if o in self.model:
                self.model[o] = self.change(self.model[o], k)

    def recording(self, rng: R, k: int) -> tuple[list[R], Callable[[R, V], V]]:
        calls: list[R] = []

        def fn(seg: R, value: V) -> V:
            assert rng.is_superset_of(seg) and not seg.is_empty
            assert not calls or calls[-1].end <= seg.start
            for o in range(seg.start, seg.end):
                assert self.model[o] == self.value_at(seg, value, o)
            calls.append(seg)
            return self.change(value, k)

        return calls, fn

    # Mutations.
    def do_insert(self, rng: R, value: V) -> None:
        if rng.is_empty or any(o in self.model for o in range(rng.start, rng.end)):
            with pytest.raises(ValueError):
                self.set.insert(rng, value)
            return
        got = self.set.insert(rng, value)
        for o in range(rng.start, rng.end):
            self.model[o] = self.value_at(rng, value, o)
        assert got.is_superset_of(rng)
        found = self.set.find(rng.start)
        assert found is not None and found[0] == got

    @rule(rng=ranges, data=st.data())
    def insert(self, rng: R, data: st.DataObject) -> None:
        self.do_insert(rng, data.draw(self.values(rng)))

    @rule(data=st.data())
    def insert_into_gap(self, data: st.DataObject) -> None:
        gaps = self.free_runs(R(0, N))
        assume(gaps)
        gap = data.draw(st.sampled_from(gaps))
        start = data.draw(st.integers(gap.start, gap.end - 1))
        rng = R(start, data.draw(st.integers(start + 1, gap.end)))
        self.do_insert(rng, data.draw(self.values(rng)))

    def values(self, rng: R) -> st.SearchStrategy[V]:
        raise NotImplementedError

    @rule(rng=ranges)
    def isolate(self, rng: R) -> None:
        self.set.isolate(rng)
        if rng.is_empty:
            return
        for p in (rng.start, rng.end):
            if (
                p - 1 in self.model
                and p in self.model
                and self.mergeable(self.model[p - 1], self.model[p])
            ):
                self.cuts.add(p)

    @rule(rng=ranges)
    def remove(self, rng: R) -> None:
        expected = runs([o for o in range(rng.start, rng.end) if o in self.model])
        removed = self.set.remove(rng)
        # Removed pieces are clipped, ascending, and cover exactly the model's offsets.
        covered = sorted(o for seg, _ in removed for o in range(seg.start, seg.end))
        assert runs(covered) == expected
        for seg, value in removed:
            assert rng.is_superset_of(seg)
            for o in range(seg.start, seg.end):
                assert self.model.pop(o) == self.value_at(seg, value, o)
        if not rng.is_empty:
            self.drop_cuts(rng.start, rng.end)

    @rule(rng=ranges, k=st.integers(-2, 2))
    def update(self, rng: R, k: int) -> None:
        calls, fn = self.recording(rng, k)
        self.set.update(rng, fn)
        covered = [o for o in range(rng.start, rng.end) if o in self.model]
        assert runs([o for seg in calls for o in range(seg.start, seg.end)]) == runs(covered)
        self.model_apply(rng, k)
        if not rng.is_empty:
            self.drop_cuts(rng.start, rng.end)

    @rule(rng=ranges)
    def merge_adjacent(self, rng: R) -> None:
        self.set.merge_adjacent(rng)
        self.drop_cuts(rng.start, rng.end)

    @rule()
    def clear(self) -> None:
        self.set.clear()
        self.model.clear()
        self.cuts.clear()

    # Queries.
    @rule(offset=offsets)
    def find(self, offset: int) -> None:
        found = self.set.find(offset)
        if offset not in self.model:
            assert found is None
            return
        assert found is not None
        seg, value = found
        assert seg.contains(offset)
        assert self.value_at(seg, value, offset) == self.model[offset]
        assert (seg, value) in list(self.set)

    @rule(offset=offsets)
    def find_gap(self, offset: int) -> None:
        gap = self.set.find_gap(offset)
        if offset in self.model:
            assert gap is None
            return
        # Beyond N everything is free: the gap then runs to MAX_OFFSET.
        [run] = [r for r in self.free_runs(R(0, N + 1)) if r.contains(offset)]
        assert gap == R(run.start, MAX_OFFSET if run.end == N + 1 else run.end)

    @rule(rng=ranges)
    def segments_and_gaps(self, rng: R) -> None:
        assert self.set.segments(rng) == [(s, v) for s, v in self.set if s.overlaps(rng)]
        assert self.set.gaps(rng) == self.free_runs(rng)

    @rule(offset=offsets, length=st.integers(1, 8), alignment=st.sampled_from([1, 2, 3, 4, 8]))
    def first_gap_from(self, offset: int, length: int, alignment: int) -> None:
        start = -(-offset // alignment) * alignment
        while any(o in self.model for o in range(start, start + length)):
            start += alignment
        assert self.set.first_gap_from(offset, length, alignment) == R(start, start + length)

    @invariant()
    def agrees_with_model(self) -> None:
        self.set.check_invariants()
        if not self.cuts:
            self.set.check_invariants(require_merged=True)
        seen: dict[int, V] = {}
        unmerged: set[int] = set()
        prev: tuple[R, V] | None = None
        for seg, value in self.set:
            for o in range(seg.start, seg.end):
                seen[o] = self.value_at(seg, value, o)
            if (
                prev is not None
                and prev[0].end == seg.start
                and self.mergeable(seen[seg.start - 1], seen[seg.start])
            ):
                unmerged.add(seg.start)
            prev = (seg, value)
        assert seen == self.model
        assert unmerged == self.cuts
        assert self.set.total_length == len(self.model)
        assert bool(self.set) == bool(self.model)
        # No positional lookups: the SortedList's positional index is never built.
        assert not self.set._map._list._index  # type: ignore[attr-defined]


class RefCountMachine(ModelMachine[int]):
    """ref_count_set: values are counts, merge iff equal."""

    def make(self) -> RangeSet[int]:
        return ref_count_set()

    def value_at(self, seg: R, value: int, offset: int) -> int:
        return value

    def mergeable(self, left: int, right: int) -> bool:
        return left == right

    def change(self, value: int, k: int) -> int:
        return (value + k) % 3

    def values(self, rng: R) -> st.SearchStrategy[int]:
        return st.integers(0, 2)


class FileRangeMachine(ModelMachine[int]):
    """file_range_set: values are memory offsets, merge iff contiguous."""

    def make(self) -> RangeSet[int]:
        return file_range_set()

    def value_at(self, seg: R, value: int, offset: int) -> int:
        return value + (offset - seg.start)

    def mergeable(self, left: int, right: int) -> bool:
        return left + 1 == right

    def change(self, value: int, k: int) -> int:
        return value + 16 * k

    def values(self, rng: R) -> st.SearchStrategy[int]:
        # Often contiguous with a neighbour's memory, so that inserts merge.
        choices = [st.integers(0, 200)]
        if rng.start - 1 in self.model:
            choices.append(st.just(self.model[rng.start - 1] + 1))
        if rng.end in self.model:
            choices.append(st.just(self.model[rng.end] - rng.length))
        return st.one_of(choices)


TestRefCountSet = RefCountMachine.TestCase
TestRefCountSet.settings = STATEFUL
TestFileRangeSet = FileRangeMachine.TestCase
TestFileRangeSet.settings = STATEFUL
