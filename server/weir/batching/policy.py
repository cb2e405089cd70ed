"""The dynamic batching policy as a pure state machine: no asyncio, no threads, the clock passed in.

``BatchQueue.next_batch(now, idle_instances, busy_instances)`` is the one decision point. It is
called whenever something changes (a request arrives, an execution finishes, a timer fires) and
answers: which queued requests expired, which batch to run now (if any), and when to look again.

The policy is work-conserving: an idle instance runs what is queued at once, unless the model is
under concurrent load; then, as in Triton, it waits up to ``max_queue_delay`` (from the oldest
request) for a fuller batch. "Concurrent load" means another instance is busy right now, or requests
have lately been arriving while others were still queued or executing (a moving average over
arrivals, forgotten after a quiet spell). So a lone request, or a closed-loop client whose next
request cannot come before this one is answered, never waits. Holding under load matters most when
the server has few cores: an execution started for one row takes the CPU from the event loop that
is reading the next rows, and one batch of N rows costs far less than N batches of one.
"""

from __future__ import annotations

import contextlib
import enum
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from weir.errors import InvalidArgumentError, ModelConfigError, clip_repr
from weir_proto.inference import messages as pb

NANOS_PER_MICRO = 1_000
_EWMA_WEIGHT = 0.2
_CONCURRENT_THRESHOLD = 0.5  # share of recent arrivals that found others in flight: "under load"
# A gap between arrivals this many times max_queue_delay ends a period of load: the share starts over.
_QUIET_SPELL_DELAYS = 10


class TimeoutAction(enum.Enum):
    REJECT = "REJECT"  # a request whose queue timeout passes is answered DEADLINE_EXCEEDED
    DELAY = "DELAY"  # it stays queued, behind every request that has not timed out


@dataclass(frozen=True)
class QueuePolicy:
    timeout_action: TimeoutAction = TimeoutAction.REJECT
    default_timeout_ns: int = 0  # 0 = no queue timeout
    allow_timeout_override: bool = False  # a request may shorten the timeout, never lengthen it
    max_queue_size: int = 0  # requests waiting at this priority level; 0 = unbounded


@dataclass(frozen=True)
class BatchingConfig:
    """What config.pbtxt says about scheduling, in Triton's terms, validated once at load."""

    batching: bool  # dynamic_batching present and max_batch_size > 0: requests may share an execution
    max_batch_size: int  # rows per execution when batching
    preferred_batch_sizes: tuple[int, ...] = ()
    max_queue_delay_ns: int = 0
    preserve_ordering: bool = False
    priority_levels: int = 1  # level 1 is the highest
    default_priority_level: int = 1
    queue_policies: tuple[QueuePolicy, ...] = (QueuePolicy(),)  # index = level - 1

    @classmethod
    def from_config(cls, config: pb.ModelConfig) -> BatchingConfig:
        source = f"model '{config.name}' config.pbtxt: field dynamic_batching"
        if not config.HasField("dynamic_batching"):
            return cls(batching=False, max_batch_size=max(1, config.max_batch_size))
        dynamic = config.dynamic_batching
        levels = max(1, dynamic.priority_levels)
        # Unset, requests without a priority go to the lowest level.
        default_level = dynamic.default_priority_level or levels
        if not 1 <= default_level <= levels:
            raise ModelConfigError(
                f"{source}.default_priority_level: expected 1..{levels}, got {dynamic.default_priority_level}"
            )
        for size in dynamic.preferred_batch_size:
            if not 1 <= size <= max(1, config.max_batch_size):
                raise ModelConfigError(
                    f"{source}.preferred_batch_size: expected sizes in 1..{config.max_batch_size} "
                    f"(max_batch_size), got {list(dynamic.preferred_batch_size)}"
                )
        for level in dynamic.priority_queue_policy:
            if not 1 <= level <= levels:
                raise ModelConfigError(f"{source}.priority_queue_policy: expected levels 1..{levels}, got {level}")
        default_policy = _queue_policy(dynamic.default_queue_policy)
        policies = tuple(
            _queue_policy(dynamic.priority_queue_policy[level])
            if level in dynamic.priority_queue_policy
            else default_policy
            for level in range(1, levels + 1)
        )
        return cls(
            batching=config.max_batch_size > 0,
            max_batch_size=max(1, config.max_batch_size),
            preferred_batch_sizes=tuple(sorted(set(dynamic.preferred_batch_size))),
            max_queue_delay_ns=dynamic.max_queue_delay_microseconds * NANOS_PER_MICRO,
            preserve_ordering=dynamic.preserve_ordering,
            priority_levels=levels,
            default_priority_level=default_level,
            queue_policies=policies,
        )

    def priority_level(self, requested: object) -> int:
        """The level for a request's ``priority`` parameter (0 or absent = the default level)."""
        if requested is None or requested == 0:
            return self.default_priority_level
        if isinstance(requested, bool) or not isinstance(requested, int):
            raise InvalidArgumentError(f"parameters['priority']: expected an integer, got {clip_repr(requested)}")
        if not 1 <= requested <= self.priority_levels:
            raise InvalidArgumentError(
                f"parameters['priority']: expected 0 (default) or 1..{self.priority_levels}, got {requested}"
            )
        return requested

    def queue_timeout_ns(self, level: int, requested_us: object) -> int:
        """The queue timeout for a request at ``level`` with Triton's ``timeout`` parameter
        (microseconds); 0 = none."""
        policy = self.queue_policies[level - 1]
        if requested_us is None:
            return policy.default_timeout_ns
        if isinstance(requested_us, bool) or not isinstance(requested_us, int) or requested_us < 0:
            raise InvalidArgumentError(
                f"parameters['timeout']: expected microseconds as a non-negative integer, got {clip_repr(requested_us)}"
            )
        if not policy.allow_timeout_override:
            return policy.default_timeout_ns
        requested_ns = requested_us * NANOS_PER_MICRO
        if policy.default_timeout_ns and (requested_ns == 0 or requested_ns > policy.default_timeout_ns):
            return policy.default_timeout_ns  # a request may shorten the timeout, never lengthen it
        return requested_ns


def _queue_policy(message: pb.ModelQueuePolicy) -> QueuePolicy:
    return QueuePolicy(
        timeout_action=(
            TimeoutAction.DELAY if message.timeout_action == pb.ModelQueuePolicy.DELAY else TimeoutAction.REJECT
        ),
        default_timeout_ns=message.default_timeout_microseconds * NANOS_PER_MICRO,
        allow_timeout_override=message.allow_timeout_override,
        max_queue_size=message.max_queue_size,
    )


@dataclass(eq=False)
class QueuedRequest:
    rows: int
    shape_key: Hashable  # requests run together only when their keys are equal (same non-batch dims)
    priority: int
    enqueued_ns: int
    deadline_ns: int | None = None  # the client's deadline: past it the request is never computed
    timeout_ns: int | None = None  # the queue timeout instant (REJECT: expire; DELAY: demote)
    payload: object = None  # the shell's own data (future, inputs); the policy never looks inside
    delayed: bool = False


@dataclass
class Decision:
    batch: list[QueuedRequest] = field(default_factory=list)  # run these together now (may be empty)
    expired: list[QueuedRequest] = field(default_factory=list)  # answer DEADLINE_EXCEEDED, never compute
    wake_at_ns: int | None = None  # call next_batch again at this instant (a delay ends, a deadline passes)


class BatchQueue:
    def __init__(self, config: BatchingConfig) -> None:
        self.config = config
        levels = config.priority_levels
        self._levels: list[deque[QueuedRequest]] = [deque() for _ in range(levels)]
        # Per level, requests whose queue timeout passed under DELAY: behind their own level's
        # punctual requests, still ahead of lower levels (Triton's order).
        self._delayed: list[deque[QueuedRequest]] = [deque() for _ in range(levels)]
        self._size = 0  # requests queued, punctual and delayed
        self._last_arrival_ns: int | None = None
        # Moving average of "this arrival found other requests queued or executing" (1) or not (0).
        self._concurrent_share = 0.0
        # No later than the earliest deadline or timeout queued (it may be earlier than the truth
        # after removals, which only costs one scan): requests without any keep decisions O(batch).
        self._earliest_expiry_ns: int | None = None

    def __len__(self) -> int:
        return self._size

    def admit(self, request: QueuedRequest, executing: int = 0) -> bool:
        """Queue ``request``; False when its priority level's queue is full (reject it at once).
        ``executing``: requests dispatched and not yet finished (to tell concurrent load from a
        sequential stream)."""
        index = request.priority - 1
        limit = self.config.queue_policies[index].max_queue_size
        if limit and len(self._levels[index]) + len(self._delayed[index]) >= limit:
            return False
        self._note_arrival(request.enqueued_ns, concurrent=executing > 0 or self._size > 0)
        self._levels[index].append(request)
        self._size += 1
        for instant in (request.deadline_ns, request.timeout_ns):
            if instant is not None and (self._earliest_expiry_ns is None or instant < self._earliest_expiry_ns):
                self._earliest_expiry_ns = instant
        return True

    def discard(self, request: QueuedRequest) -> None:
        """Forget a request whose caller went away (a no-op if it already left the queue)."""
        index = request.priority - 1
        queue = self._delayed[index] if request.delayed else self._levels[index]
        with contextlib.suppress(ValueError):
            queue.remove(request)
            self._size -= 1

    def next_batch(self, now_ns: int, idle_instances: int, busy_instances: int = 0) -> Decision:
        decision = Decision(expired=self._expire(now_ns))
        head = next(self._in_order(), None)
        if head is None:
            return decision
        next_expiry = self._next_expiry()
        if idle_instances <= 0:
            decision.wake_at_ns = next_expiry  # instances busy: look again when one frees or one expires
            return decision
        candidates = self._candidates(head)
        preferred = self._preferred_prefix(candidates)
        under_load = busy_instances > 0 or self._concurrent_share >= _CONCURRENT_THRESHOLD
        wait_until = None if preferred or not under_load else self._hold_until(candidates, now_ns)
        if wait_until is None:
            batch = preferred or candidates
            self._remove(batch)
            decision.batch = batch
            decision.wake_at_ns = self._next_expiry()
        else:
            decision.wake_at_ns = wait_until if next_expiry is None else min(wait_until, next_expiry)
        return decision

    # --- the pieces of the decision -------------------------------------------------------------

    def _expire(self, now_ns: int) -> list[QueuedRequest]:
        if self._earliest_expiry_ns is None or now_ns < self._earliest_expiry_ns:
            return []
        expired: list[QueuedRequest] = []
        for index, queue in enumerate(self._levels):
            if not any(_is_due(request, now_ns) for request in queue):
                continue
            delay = self.config.queue_policies[index].timeout_action is TimeoutAction.DELAY
            kept: deque[QueuedRequest] = deque()
            for request in queue:
                if request.deadline_ns is not None and request.deadline_ns <= now_ns:
                    expired.append(request)
                elif request.timeout_ns is not None and request.timeout_ns <= now_ns:
                    if delay:
                        request.delayed, request.timeout_ns = True, None
                        self._delayed[index].append(request)
                    else:
                        expired.append(request)
                else:
                    kept.append(request)
            self._levels[index] = kept
        for index, queue in enumerate(self._delayed):
            if any(_is_due(request, now_ns) for request in queue):  # only a client deadline is left
                expired.extend(request for request in queue if _is_due(request, now_ns))
                self._delayed[index] = deque(request for request in queue if not _is_due(request, now_ns))
        self._earliest_expiry_ns = self._scan_earliest_expiry()
        self._size -= len(expired)
        return expired

    def _in_order(self) -> Iterator[QueuedRequest]:
        for punctual, delayed in zip(self._levels, self._delayed, strict=True):
            yield from punctual
            yield from delayed

    def _candidates(self, head: QueuedRequest) -> list[QueuedRequest]:
        """The head plus, in priority then arrival order, what fits beside it: same shape key and
        rows within max_batch_size. With preserve_ordering nothing is taken past a request left out."""
        if not self.config.batching:
            return [head]
        chosen: list[QueuedRequest] = []
        rows = 0
        for request in self._in_order():
            fits = request.shape_key == head.shape_key and rows + request.rows <= self.config.max_batch_size
            if fits:
                chosen.append(request)
                rows += request.rows
                if rows == self.config.max_batch_size:
                    break
            elif self.config.preserve_ordering:
                break
        return chosen

    def _preferred_prefix(self, candidates: list[QueuedRequest]) -> list[QueuedRequest]:
        """The longest prefix of ``candidates`` whose rows make a preferred batch size (Triton runs
        such a batch at once and leaves the rest for the next one); empty when there is none."""
        preferred = self.config.preferred_batch_sizes
        if not preferred or not self.config.batching:
            return []
        best = 0
        rows = 0
        for count, request in enumerate(candidates, start=1):
            rows += request.rows
            if rows in preferred:
                best = count
        return candidates[:best]

    def _hold_until(self, candidates: list[QueuedRequest], now_ns: int) -> int | None:
        """None = run now; otherwise the instant to look again while waiting for more rows."""
        config = self.config
        rows = sum(request.rows for request in candidates)
        if not config.batching or rows >= config.max_batch_size or config.max_queue_delay_ns == 0:
            return None
        oldest = min(request.enqueued_ns for request in candidates)
        release_at = oldest + config.max_queue_delay_ns
        if release_at <= now_ns:
            return None
        return release_at

    def _remove(self, chosen: list[QueuedRequest]) -> None:
        self._size -= len(chosen)
        first = self._levels[chosen[0].priority - 1] if not chosen[0].delayed else None
        if (
            first is not None
            and len(first) >= len(chosen)
            and all(queued is request for queued, request in zip(first, chosen, strict=False))
        ):
            for _ in chosen:  # the usual case: the batch is the head of one level's queue
                first.popleft()
            return
        taken = {id(request) for request in chosen}
        for queues in (self._levels, self._delayed):
            for index, queue in enumerate(queues):
                if any(id(request) in taken for request in queue):
                    queues[index] = deque(request for request in queue if id(request) not in taken)

    def _next_expiry(self) -> int | None:
        return self._earliest_expiry_ns

    def _scan_earliest_expiry(self) -> int | None:
        instants = [
            instant
            for request in self._in_order()
            for instant in (request.deadline_ns, request.timeout_ns)
            if instant is not None
        ]
        return min(instants) if instants else None

    def _note_arrival(self, now_ns: int, concurrent: bool) -> None:
        quiet_spell = max(self.config.max_queue_delay_ns * _QUIET_SPELL_DELAYS, 1)
        if self._last_arrival_ns is not None and now_ns - self._last_arrival_ns > quiet_spell:
            self._concurrent_share = 0.0  # the load that was is over: do not hold the first request after it
        self._last_arrival_ns = now_ns
        self._concurrent_share += _EWMA_WEIGHT * ((1.0 if concurrent else 0.0) - self._concurrent_share)


def _is_due(request: QueuedRequest, now_ns: int) -> bool:
    return (request.deadline_ns is not None and request.deadline_ns <= now_ns) or (
        request.timeout_ns is not None and request.timeout_ns <= now_ns
    )
