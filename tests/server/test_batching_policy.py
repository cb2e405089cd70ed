"""weir.batching.policy: the dynamic batching policy as a pure state machine, driven here with a fake
integer clock (nanoseconds) and no asyncio.

Requests carry their name as ``payload`` so a batch reads as a list of names. ``steady`` admits
requests a few microseconds apart while others are in flight (concurrent load), so an idle instance
may wait for a batch to fill; ``sequential`` admits each one after the previous one finished (a
closed-loop client of one), and nothing ever waits.
"""

from __future__ import annotations

from collections.abc import Hashable

import pytest

from weir.batching.policy import BatchingConfig, BatchQueue, QueuedRequest, TimeoutAction
from weir.errors import InvalidArgumentError, ModelConfigError
from weir.model_config import parse_config_text

US = 1_000
MS = 1_000_000
S = 1_000_000_000
GAP = 100 * US  # between two arrivals of a steady stream


def batching(dynamic: str | None = "", max_batch_size: int = 8) -> BatchingConfig:
    """The BatchingConfig of a model with ``dynamic_batching { <dynamic> }`` (None: no such block)."""
    text = f'name: "m" max_batch_size: {max_batch_size}'
    if dynamic is not None:
        text += f" dynamic_batching {{ {dynamic} }}"
    return BatchingConfig.from_config(parse_config_text(text, "test config"))


def request(
    name: str,
    at: int = 0,
    rows: int = 1,
    key: Hashable = "k",
    priority: int = 1,
    deadline: int | None = None,
    timeout: int | None = None,
) -> QueuedRequest:
    return QueuedRequest(
        rows=rows,
        shape_key=key,
        priority=priority,
        enqueued_ns=at,
        deadline_ns=deadline,
        timeout_ns=timeout,
        payload=name,
    )


def names(requests: list[QueuedRequest]) -> list[object]:
    return [queued.payload for queued in requests]


def admit_all(queue: BatchQueue, *requests: QueuedRequest) -> None:
    for queued in requests:
        assert queue.admit(queued), queued.payload


def steady(queue: BatchQueue, *labels: str, start: int = 0, executing: int = 1) -> int:
    """Admit one single-row request per label, GAP apart, each while ``executing`` requests are
    being computed (concurrent load); returns the last arrival instant."""
    at = start
    for index, label in enumerate(labels):
        at = start + index * GAP
        assert queue.admit(request(label, at=at), executing=executing), label
    return at


def sequential(queue: BatchQueue, count: int, start: int = 0) -> int:
    """``count`` requests GAP apart, each run alone before the next arrives; returns the last instant."""
    at = start
    for index in range(count):
        at = start + index * GAP
        admit_all(queue, request(f"s{index}", at=at))
        assert len(queue.next_batch(at, idle_instances=1).batch) == 1
    return at


def drain(queue: BatchQueue, now: int) -> list[list[object]]:
    """Every batch one idle instance would run, in order, at ``now`` (a bounded loop)."""
    batches = []
    for _ in range(len(queue)):
        decision = queue.next_batch(now, idle_instances=1)
        if not decision.batch:
            break
        batches.append(names(decision.batch))
    return batches


# --- BatchingConfig.from_config ------------------------------------------------------------------


def test_config_reads_the_dynamic_batching_fields() -> None:
    config = batching(
        "preferred_batch_size: [ 8, 4, 4 ] max_queue_delay_microseconds: 1500 preserve_ordering: true "
        "priority_levels: 3 default_priority_level: 2 "
        "default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 700 max_queue_size: 5 } "
        "priority_queue_policy { key: 1 value: { allow_timeout_override: true max_queue_size: 9 } }",
        max_batch_size=16,
    )
    assert config.batching and config.max_batch_size == 16
    assert config.preferred_batch_sizes == (4, 8)  # sorted, duplicates dropped
    assert config.max_queue_delay_ns == 1500 * US
    assert config.preserve_ordering
    assert (config.priority_levels, config.default_priority_level) == (3, 2)
    level_1, level_2, level_3 = config.queue_policies
    assert (level_1.allow_timeout_override, level_1.max_queue_size, level_1.default_timeout_ns) == (True, 9, 0)
    assert level_2 == level_3  # the levels without their own policy get the default one
    assert (level_2.timeout_action, level_2.default_timeout_ns, level_2.max_queue_size) == (
        TimeoutAction.DELAY,
        700 * US,
        5,
    )


def test_config_without_priority_levels_has_one_level_and_unset_default_is_the_lowest() -> None:
    single = batching("")
    assert (single.priority_levels, single.default_priority_level) == (1, 1)
    assert batching("priority_levels: 4").default_priority_level == 4


def test_config_without_dynamic_batching_or_max_batch_size_does_not_batch() -> None:
    assert not batching(None, max_batch_size=8).batching
    assert batching(None, max_batch_size=8).max_batch_size == 8
    assert not batching("", max_batch_size=0).batching


@pytest.mark.parametrize(
    ("dynamic", "field", "detail"),
    [
        ("preferred_batch_size: [ 4, 16 ]", "dynamic_batching.preferred_batch_size", "max_batch_size"),
        ("preferred_batch_size: [ 0 ]", "dynamic_batching.preferred_batch_size", "got [0]"),
        ("priority_levels: 2 default_priority_level: 3", "dynamic_batching.default_priority_level", "got 3"),
        (
            "priority_levels: 2 priority_queue_policy { key: 3 value: { max_queue_size: 1 } }",
            "dynamic_batching.priority_queue_policy",
            "got 3",
        ),
        (
            "priority_queue_policy { key: 2 value: { max_queue_size: 1 } }",  # one level only
            "dynamic_batching.priority_queue_policy",
            "expected levels 1..1",
        ),
    ],
)
def test_config_errors_name_the_field(dynamic: str, field: str, detail: str) -> None:
    with pytest.raises(ModelConfigError) as raised:
        batching(dynamic, max_batch_size=8)
    assert "model 'm' config.pbtxt" in raised.value.message
    assert field in raised.value.message
    assert detail in raised.value.message


# --- when a batch runs -----------------------------------------------------------------------------


def test_a_lone_request_without_arrival_history_runs_at_once_despite_a_long_delay() -> None:
    queue = BatchQueue(batching("max_queue_delay_microseconds: 5000000"))  # 5 s
    admit_all(queue, request("lone", at=10 * MS))

    decision = queue.next_batch(10 * MS, idle_instances=1)

    assert names(decision.batch) == ["lone"]
    assert decision.expired == [] and decision.wake_at_ns is None
    assert len(queue) == 0


def test_a_sequential_stream_never_waits_however_frequent() -> None:
    """A closed-loop client's next request cannot come before this one is answered: with nothing
    in flight at each arrival there is no load to batch with, however short the gaps."""
    queue = BatchQueue(batching("max_queue_delay_microseconds: 10000"))
    last = sequential(queue, 50)
    admit_all(queue, request("next", at=last + GAP))
    assert names(queue.next_batch(last + GAP, idle_instances=1).batch) == ["next"]


def test_under_concurrent_load_the_only_instance_waits_for_a_fuller_batch() -> None:
    """Requests that keep arriving while others are computed: with its one instance idle again, the
    queue holds what it has until the delay of the oldest ends (Triton's max_queue_delay)."""
    queue = BatchQueue(batching("max_queue_delay_microseconds: 10000"))  # 10 ms
    last = steady(queue, "a", "b", "c", "d", executing=1)

    held = queue.next_batch(last, idle_instances=1, busy_instances=0)
    assert held.batch == [] and held.wake_at_ns == 10 * MS
    admit_all(queue, request("e", at=last + GAP))
    assert queue.next_batch(last + GAP, idle_instances=1).batch == []
    assert names(queue.next_batch(10 * MS, idle_instances=1).batch) == ["a", "b", "c", "d", "e"]


def test_a_few_concurrent_arrivals_in_a_sequential_stream_do_not_make_it_wait() -> None:
    queue = BatchQueue(batching("max_queue_delay_microseconds: 10000"))
    last = sequential(queue, 20)
    last = steady(queue, "a", "b", start=last + GAP)  # two arrivals found another in flight
    assert names(queue.next_batch(last, idle_instances=1).batch) == ["a", "b"]


def test_after_a_quiet_spell_the_first_request_runs_at_once_despite_earlier_load() -> None:
    queue = BatchQueue(batching("max_queue_delay_microseconds: 1000"))  # 1 ms
    last = steady(queue, *"abcdefgh", executing=1)
    assert drain(queue, last + 1 * MS) == [["a", "b", "c", "d", "e", "f", "g", "h"]]

    after_quiet = last + 20 * MS  # more than ten delays without an arrival
    admit_all(queue, request("lone", at=after_quiet))
    assert names(queue.next_batch(after_quiet, idle_instances=1).batch) == ["lone"]


def test_a_steady_stream_holds_an_idle_instance_until_the_delay_of_the_oldest_ends() -> None:
    """Under load (another instance busy) an idle instance waits for a fuller batch."""
    queue = BatchQueue(batching("max_queue_delay_microseconds: 10000"))  # 10 ms
    last = steady(queue, "a", "b", "c", executing=0)

    held = queue.next_batch(last, idle_instances=1, busy_instances=1)
    assert held.batch == [] and held.expired == []
    assert held.wake_at_ns == 0 + 10 * MS  # the oldest arrived at 0
    assert queue.next_batch(last + GAP, idle_instances=1, busy_instances=1).batch == []  # still held, nothing arrived

    released = queue.next_batch(10 * MS, idle_instances=1, busy_instances=1)
    assert names(released.batch) == ["a", "b", "c"]
    assert len(queue) == 0


def test_a_full_batch_runs_at_once() -> None:
    queue = BatchQueue(batching("max_queue_delay_microseconds: 10000", max_batch_size=4))
    last = steady(queue, "a", "b", "c")
    assert queue.next_batch(last, idle_instances=1, busy_instances=1).batch == []  # would wait for a 4th row

    admit_all(queue, request("d", at=last + GAP))
    decision = queue.next_batch(last + GAP, idle_instances=1, busy_instances=1)
    assert names(decision.batch) == ["a", "b", "c", "d"]


def test_reaching_the_preferred_batch_size_runs_at_once() -> None:
    queue = BatchQueue(batching("preferred_batch_size: 4 max_queue_delay_microseconds: 10000", max_batch_size=16))
    last = steady(queue, "a", "b", "c")
    assert queue.next_batch(last, idle_instances=1, busy_instances=1).batch == []

    admit_all(queue, request("d", at=last + GAP))
    assert names(queue.next_batch(last + GAP, idle_instances=1, busy_instances=1).batch) == ["a", "b", "c", "d"]


def test_reaching_a_smaller_preferred_batch_size_runs_at_once() -> None:
    queue = BatchQueue(
        batching("preferred_batch_size: [ 2, 4 ] max_queue_delay_microseconds: 10000", max_batch_size=16)
    )
    last = steady(queue, "a", "b")
    assert names(queue.next_batch(last, idle_instances=1).batch) == ["a", "b"]


def test_more_rows_than_the_largest_preferred_size_run_as_that_size_and_the_rest_waits() -> None:
    queue = BatchQueue(batching("preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 10000", max_batch_size=16))
    # Six rows are queued while the only instance is busy (two 3-row requests would skip 4: single rows here).
    last = steady(queue, "a", "b", "c", "d", "e", "f")
    assert queue.next_batch(last, idle_instances=0).batch == []
    assert names(queue.next_batch(last, idle_instances=1).batch) == ["a", "b", "c", "d"]
    assert len(queue) == 2  # e and f wait for the next batch (or the delay)


def test_without_an_idle_instance_nothing_runs_and_the_wake_up_is_the_next_expiry() -> None:
    queue = BatchQueue(batching("max_queue_delay_microseconds: 10000"))
    admit_all(queue, request("a", at=0, deadline=50 * MS), request("b", at=GAP, timeout=30 * MS), request("c", at=GAP))

    busy = queue.next_batch(2 * GAP, idle_instances=0)
    assert busy.batch == [] and busy.expired == []
    assert busy.wake_at_ns == 30 * MS  # b's queue timeout comes before a's deadline
    assert len(queue) == 3

    no_expiry = BatchQueue(batching(""))
    admit_all(no_expiry, request("x"))
    assert no_expiry.next_batch(0, idle_instances=0).wake_at_ns is None  # only a finished execution wakes it


def test_rows_count_against_max_batch_size_and_a_request_that_does_not_fit_waits() -> None:
    queue = BatchQueue(batching("", max_batch_size=4))
    admit_all(queue, request("three", rows=3), request("two", rows=2), request("one", rows=1))

    first = queue.next_batch(0, idle_instances=1)
    assert names(first.batch) == ["three", "one"]  # 3 + 1 rows: full; "two" would make 5
    assert sum(queued.rows for queued in first.batch) == 4
    assert drain(queue, 0) == [["two"]]


def test_requests_with_different_shape_keys_never_share_a_batch_and_the_heads_group_goes_first() -> None:
    queue = BatchQueue(batching(""))
    admit_all(
        queue,
        request("short-1", key="len3"),
        request("long-1", key="len5"),
        request("short-2", key="len3"),
        request("long-2", key="len5"),
    )
    assert drain(queue, 0) == [["short-1", "short-2"], ["long-1", "long-2"]]


def test_preserve_ordering_stops_a_batch_at_the_first_request_that_does_not_match() -> None:
    queue = BatchQueue(batching("preserve_ordering: true"))
    admit_all(
        queue,
        request("a1", key="a"),
        request("a2", key="a"),
        request("b1", key="b"),
        request("a3", key="a"),
    )
    assert drain(queue, 0) == [["a1", "a2"], ["b1"], ["a3"]]

    queue = BatchQueue(batching("preserve_ordering: true", max_batch_size=4))
    admit_all(queue, request("three", rows=3), request("two", rows=2), request("one", rows=1))
    assert drain(queue, 0) == [["three"], ["two", "one"]]  # "one" may not jump ahead of "two"


# --- priorities ---------------------------------------------------------------------------------


def test_a_higher_priority_level_runs_first_regardless_of_arrival() -> None:
    queue = BatchQueue(batching("priority_levels: 2", max_batch_size=1))
    admit_all(queue, request("low-early", at=0, priority=2), request("high-late", at=GAP, priority=1))
    assert drain(queue, GAP) == [["high-late"], ["low-early"]]


def test_priority_parameter_zero_or_absent_means_the_default_level() -> None:
    config = batching("priority_levels: 3 default_priority_level: 2")
    assert config.priority_level(None) == 2
    assert config.priority_level(0) == 2
    assert config.priority_level(1) == 1
    assert config.priority_level(3) == 3


@pytest.mark.parametrize("bad", [4, -1, "1", 1.5, True])
def test_an_invalid_priority_is_an_invalid_argument_naming_the_parameter(bad: object) -> None:
    config = batching("priority_levels: 3")
    with pytest.raises(InvalidArgumentError, match=r"parameters\['priority'\]"):
        config.priority_level(bad)


def test_max_queue_size_is_per_level_and_a_full_level_refuses_at_once() -> None:
    queue = BatchQueue(
        batching(
            "priority_levels: 2 default_queue_policy { max_queue_size: 2 } "
            "priority_queue_policy { key: 2 value: { max_queue_size: 1 } }"
        )
    )
    admit_all(queue, request("h1", priority=1), request("h2", priority=1), request("l1", priority=2))
    assert not queue.admit(request("h3", priority=1))
    assert not queue.admit(request("l2", priority=2))
    assert len(queue) == 3

    assert drain(queue, 0) == [["h1", "h2", "l1"]]
    assert queue.admit(request("h4", priority=1))  # room again once the queue drained


def test_unbounded_max_queue_size_admits_everything() -> None:
    queue = BatchQueue(batching(""))
    admit_all(queue, *(request(str(index)) for index in range(100)))
    assert len(queue) == 100


# --- deadlines and queue timeouts ---------------------------------------------------------------


def test_a_request_past_its_client_deadline_expires_and_is_never_batched() -> None:
    queue = BatchQueue(batching(""))
    admit_all(queue, request("late", at=0, deadline=5 * MS), request("fine", at=GAP))

    assert queue.next_batch(1 * MS, idle_instances=0).wake_at_ns == 5 * MS
    expired = queue.next_batch(5 * MS, idle_instances=0)
    assert names(expired.expired) == ["late"] and expired.batch == []

    assert drain(queue, 5 * MS) == [["fine"]]
    assert len(queue) == 0


def test_reject_queue_timeout_expires_the_request() -> None:
    config = batching("default_queue_policy { timeout_action: REJECT default_timeout_microseconds: 1000 }")
    queue = BatchQueue(config)
    admit_all(queue, request("timed", at=0, timeout=0 + config.queue_timeout_ns(1, None)))

    assert queue.next_batch(0, idle_instances=0).wake_at_ns == 1 * MS
    decision = queue.next_batch(1 * MS, idle_instances=1)
    assert names(decision.expired) == ["timed"] and decision.batch == []
    assert len(queue) == 0


def test_delay_queue_timeout_demotes_behind_requests_that_have_not_timed_out_but_still_runs() -> None:
    config = batching(
        "default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 1000 }", max_batch_size=1
    )
    queue = BatchQueue(config)
    timeout = config.queue_timeout_ns(1, None)
    admit_all(
        queue,
        request("first", at=0, timeout=0 + timeout),
        request("second", at=500 * US, timeout=500 * US + timeout),
    )

    decision = queue.next_batch(1 * MS, idle_instances=1)  # "first" timed out, "second" did not
    assert decision.expired == []
    assert names(decision.batch) == ["second"]
    assert drain(queue, 1 * MS) == [["first"]]


def test_delay_keeps_a_timed_out_request_ahead_of_lower_priority_levels() -> None:
    config = batching(
        "priority_levels: 2 priority_queue_policy { key: 1 value: { timeout_action: DELAY "
        "default_timeout_microseconds: 1000 } }",
        max_batch_size=1,
    )
    queue = BatchQueue(config)
    admit_all(
        queue,
        request("high-delayed", at=0, priority=1, timeout=config.queue_timeout_ns(1, None)),
        request("low", at=GAP, priority=2),
    )
    assert drain(queue, 2 * MS) == [["high-delayed"], ["low"]]


def test_delayed_requests_still_count_against_max_queue_size() -> None:
    config = batching(
        "default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 1000 max_queue_size: 1 }"
    )
    queue = BatchQueue(config)
    admit_all(queue, request("delayed", at=0, timeout=config.queue_timeout_ns(1, None)))
    assert queue.next_batch(2 * MS, idle_instances=0).expired == []  # demoted, still queued
    assert len(queue) == 1

    assert not queue.admit(request("over-the-limit", at=2 * MS))


def test_queue_timeout_default_override_and_bad_values() -> None:
    fixed = batching("default_queue_policy { default_timeout_microseconds: 10000 }")
    assert fixed.queue_timeout_ns(1, None) == 10 * MS
    assert fixed.queue_timeout_ns(1, 1000) == 10 * MS  # override not allowed: ignored

    overridable = batching("default_queue_policy { default_timeout_microseconds: 10000 allow_timeout_override: true }")
    assert overridable.queue_timeout_ns(1, None) == 10 * MS
    assert overridable.queue_timeout_ns(1, 1000) == 1 * MS  # shortened
    assert overridable.queue_timeout_ns(1, 20000) == 10 * MS  # never lengthened
    assert overridable.queue_timeout_ns(1, 0) == 10 * MS  # 0 cannot remove the timeout

    assert batching("").queue_timeout_ns(1, None) == 0  # no queue timeout at all

    for bad in (-1, "1000", 1.5, True):
        with pytest.raises(InvalidArgumentError, match=r"parameters\['timeout'\]"):
            overridable.queue_timeout_ns(1, bad)
        with pytest.raises(InvalidArgumentError, match=r"parameters\['timeout'\]"):
            fixed.queue_timeout_ns(1, bad)


def test_queue_timeout_follows_the_requests_priority_level() -> None:
    config = batching(
        "priority_levels: 2 default_queue_policy { default_timeout_microseconds: 10000 } "
        "priority_queue_policy { key: 1 value: { default_timeout_microseconds: 2000 } }"
    )
    assert config.queue_timeout_ns(1, None) == 2 * MS
    assert config.queue_timeout_ns(2, None) == 10 * MS


# --- cancellation and batching disabled --------------------------------------------------------------


def test_discard_removes_a_cancelled_request() -> None:
    queue = BatchQueue(batching(""))
    gone, kept = request("gone"), request("kept")
    admit_all(queue, gone, kept)

    queue.discard(gone)
    assert len(queue) == 1
    assert drain(queue, 0) == [["kept"]]
    queue.discard(kept)  # already left the queue: a no-op
    assert len(queue) == 0


def test_discard_removes_a_delayed_request() -> None:
    config = batching("default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 1000 }")
    queue = BatchQueue(config)
    delayed = request("delayed", at=0, timeout=config.queue_timeout_ns(1, None))
    admit_all(queue, delayed)
    assert queue.next_batch(2 * MS, idle_instances=0).expired == []
    assert delayed.delayed

    queue.discard(delayed)
    assert len(queue) == 0


def test_without_dynamic_batching_every_batch_holds_exactly_one_request() -> None:
    queue = BatchQueue(batching(None, max_batch_size=8))
    admit_all(queue, *(request(name, at=index * GAP) for index, name in enumerate("abcd")))
    assert drain(queue, 4 * GAP) == [["a"], ["b"], ["c"], ["d"]]


# --- the arrival estimate ----------------------------------------------------------------------


def test_a_lone_request_after_a_long_idle_period_runs_at_once() -> None:
    queue = BatchQueue(batching("max_queue_delay_microseconds: 2000000"))  # 2 s
    last = steady(queue, "a", "b", "c")
    assert drain(queue, last + 2 * S) == [["a", "b", "c"]]

    idle_until = last + 60 * S  # a minute without a single request
    admit_all(queue, request("lone", at=idle_until))
    assert names(queue.next_batch(idle_until, idle_instances=1).batch) == ["lone"]


def test_the_queue_length_stays_true_through_a_random_mix_of_operations() -> None:
    """len() is a running count: after any mix of arrivals, batches, expiries, demotions and
    discards it equals the requests actually held."""
    import random

    randomness = random.Random(7)
    config = batching(
        "priority_levels: 2 default_priority_level: 2 max_queue_delay_microseconds: 500 "
        "default_queue_policy { timeout_action: DELAY default_timeout_microseconds: 300 } "
        "priority_queue_policy { key: 1 value { default_timeout_microseconds: 200 max_queue_size: 6 } }",
        max_batch_size=4,
    )
    queue = BatchQueue(config)
    held: list[QueuedRequest] = []
    now = 0
    for step in range(3000):
        now += randomness.randrange(0, 150) * US
        action = randomness.random()
        if action < 0.5:
            queued = request(
                f"r{step}",
                at=now,
                rows=randomness.choice([1, 1, 2, 3]),
                key=randomness.choice("ab"),
                priority=randomness.choice([1, 2]),
                deadline=now + randomness.randrange(100, 2000) * US if randomness.random() < 0.3 else None,
                timeout=now + 200 * US if randomness.random() < 0.5 else None,
            )
            if queue.admit(queued, executing=randomness.choice([0, 1])):
                held.append(queued)
        elif action < 0.6 and held:
            queue.discard(randomness.choice(held))
        else:
            decision = queue.next_batch(now, idle_instances=randomness.choice([0, 1, 1]))
            for gone in decision.batch + decision.expired:
                held.remove(gone)
        actual = sum(len(level) for level in queue._levels) + sum(len(level) for level in queue._delayed)
        assert len(queue) == actual, f"step {step}"
        held = [queued for queued in held if any(queued in level for level in (*queue._levels, *queue._delayed))]
        assert len(held) == actual
