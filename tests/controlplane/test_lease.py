"""The singleton lease of several control-plane replicas: acquire, renew, expire, take over after a
kill -9, and fencing that refuses an old holder's side effects, on SQLite and PostgreSQL. Each
keeper has its own Store (its own engine and connections), as separate replicas do."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from weir_control.attach import ReplicaStream
from weir_control.lease import LeaseKeeper, LostLease, read_lease
from weir_control.replica_reports import ReplicaReports
from weir_control.store import Store, open_store
from weir_control.store.schema import LEASES
from weir_proto.control.v1 import deployments_pb2


async def take_over(keeper: LeaseKeeper) -> None:
    """Try as the run loop does (every ttl/3) until the keeper holds the lease."""
    for _ in range(600):
        if await keeper.acquire_once():
            return
        await asyncio.sleep(keeper.ttl / 3)
    raise AssertionError(f"{keeper.holder} never took the lease over")


@pytest.fixture
def stores(store_url: str) -> Iterator[tuple[Store, Store]]:
    first, second = open_store(store_url), open_store(store_url)
    yield first, second
    first.close()
    second.close()


async def test_the_first_keeper_holds_and_renews_in_the_same_term(stores: tuple[Store, Store]) -> None:
    a, b = LeaseKeeper(stores[0], "a"), LeaseKeeper(stores[1], "b")
    assert await a.acquire_once()
    term = a.token
    assert await a.acquire_once()  # renewal: the same term
    assert a.token == term and a.terms == 1
    assert not await b.acquire_once()
    assert not b.held


async def test_an_expired_lease_goes_to_the_next_holder_with_the_next_token(stores: tuple[Store, Store]) -> None:
    # a's own clock stands still: it still believes it holds the lease, as a stalled holder would
    a = LeaseKeeper(stores[0], "a", ttl=0.5, clock=lambda: 0.0)
    b = LeaseKeeper(stores[1], "b", ttl=0.5)
    assert await a.acquire_once()
    await take_over(b)  # once the database's clock passes a's expiry
    assert b.token == a.token + 1
    assert a.held  # locally: only the fence knows better
    with pytest.raises(LostLease, match="no longer current"), stores[0].engine.begin() as connection:
        a.fence(connection)
    with stores[1].engine.begin() as connection:
        b.fence(connection)  # the current term passes


async def test_a_fenced_change_of_an_old_holder_commits_nothing(stores: tuple[Store, Store]) -> None:
    a = LeaseKeeper(stores[0], "a", ttl=0.5, clock=lambda: 0.0)
    b = LeaseKeeper(stores[1], "b", ttl=0.5)
    assert await a.acquire_once()
    await take_over(b)
    mark = LEASES.insert().values(name="side-effect", holder="", token=0, expires_at=0.0)
    with pytest.raises(LostLease), stores[0].engine.begin() as connection:
        connection.execute(mark)  # written first: the fence's refusal rolls it back
        a.fence(connection)
    with stores[1].engine.begin() as connection:
        assert connection.execute(select(LEASES.c.name)).scalars().all() == ["singleton"]
        b.fence(connection)
        connection.execute(mark)
    with stores[0].engine.begin() as connection:
        assert sorted(connection.execute(select(LEASES.c.name)).scalars()) == ["side-effect", "singleton"]


async def test_a_clean_stop_hands_the_lease_over_at_once(stores: tuple[Store, Store]) -> None:
    a, b = LeaseKeeper(stores[0], "a", ttl=60.0), LeaseKeeper(stores[1], "b", ttl=60.0)
    task = asyncio.create_task(a.run())
    await asyncio.wait_for(a.wait_held(), 30)
    assert not await b.acquire_once()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert not a.held
    assert await b.acquire_once()  # released: no 60 s wait
    assert b.token == a.token + 1


async def test_singleton_work_runs_only_while_held(stores: tuple[Store, Store]) -> None:
    a = LeaseKeeper(stores[0], "a", ttl=60.0)
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def work() -> None:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            cancelled.set()

    singleton = asyncio.create_task(a.singleton("work", work))
    await asyncio.sleep(0.05)
    assert not started.is_set()  # not held yet
    assert await a.acquire_once()
    await asyncio.wait_for(started.wait(), 30)
    # the term ends (another replica took it after expiry): the work is cancelled
    with stores[1].engine.begin() as connection:
        connection.execute(LEASES.update().values(holder="b", token=LEASES.c.token + 1))
    assert not await a.acquire_once()
    await asyncio.wait_for(cancelled.wait(), 30)
    singleton.cancel()
    with pytest.raises(asyncio.CancelledError):
        await singleton


HOLDER = textwrap.dedent(
    """
    import asyncio, sys
    from weir_control.lease import LeaseKeeper
    from weir_control.store import open_store

    async def main():
        keeper = LeaseKeeper(open_store(sys.argv[1]), "doomed", ttl=1.0)
        task = asyncio.create_task(keeper.run())
        await keeper.wait_held()
        print("held", keeper.token, flush=True)
        await task

    asyncio.run(main())
    """
)


async def test_a_killed_holder_is_replaced(store_url: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, store_url, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 60)).decode()
        assert line.startswith("held"), line
        doomed_token = int(line.split()[1])
        store = open_store(store_url)
        survivor = LeaseKeeper(store, "survivor", ttl=1.0)
        assert not await survivor.acquire_once()
        process.kill()  # kill -9: no release
        await process.wait()
        task = asyncio.create_task(survivor.run())
        await asyncio.wait_for(survivor.wait_held(), 60)
        assert survivor.token == doomed_token + 1
        with store.engine.begin() as connection:
            found = read_lease(connection, survivor.name)
            assert found is not None and found[0] == "survivor"
            assert connection.execute(select(LEASES.c.holder)).scalars().all() == ["survivor"]
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        store.close()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_every_replica_reads_the_data_planes_attached_to_any_replica(stores: tuple[Store, Store]) -> None:
    """replica_reports: each control replica publishes its attach streams' accepted status; any
    replica reads all of them (the holder's rollout analysis) and the others' (ListReplicas); a
    clean stop takes its rows away at once."""
    hello = deployments_pb2.Hello(replica_id="dp-1", address="127.0.0.1:1")
    hello.status.variants.add(endpoint="scorer", variant="primary", version=1, succeeded=5)
    stream = ReplicaStream(hello, identity="data-plane")
    first = ReplicaReports(stores[0], "first", lambda: [stream], address="127.0.0.1:11")
    second = ReplicaReports(stores[1], "second", lambda: [], address="127.0.0.1:12")
    first.publish(first.snapshot())
    second.publish(second.snapshot())
    [reported] = second.read()
    assert reported.stream == f"first/{stream.stream}" and reported.identity == "data-plane"
    assert reported.info.replica_id == "dp-1"
    assert [info.replica_id for info in second.other_replicas()] == ["dp-1"] and first.other_replicas() == []
    assert second.addresses() == ["127.0.0.1:12", "127.0.0.1:11"]
    first.forget()
    assert second.read() == [] and second.addresses() == ["127.0.0.1:12"]


async def test_a_term_known_dead_is_taken_at_once_and_its_holder_fenced(stores: tuple[Store, Store]) -> None:
    a = LeaseKeeper(stores[0], "a", ttl=60.0, clock=lambda: 0.0)
    b = LeaseKeeper(stores[1], "b", ttl=60.0)
    assert await a.acquire_once()
    assert not await b.take_over_from("a", a.token + 5)  # not the term it holds: nothing changes
    assert await b.take_over_from("a", a.token)  # a restarted replica found a dead: no 60 s wait
    assert b.held and b.token == a.token + 1
    with pytest.raises(LostLease), stores[0].engine.begin() as connection:
        a.fence(connection)
    assert not await a.acquire_once() and not a.held
