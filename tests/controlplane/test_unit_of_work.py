"""One unit of work per change: Store.transaction() joins every store call made inside it on the
same thread, commits them together, and on an exception keeps none (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading

import pytest

from weir_control.model_config import signature_from_config
from weir_control.store import Store
from weir_control.store.db import REVISION_CHANNEL
from weir_control.store.store import create_store_engine
from weir_proto.control.v1 import deployments_pb2, registry_pb2

CONFIG = """
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""
SHA = "cd" * 32


@pytest.fixture
def store(store_url: str) -> Store:
    opened = Store(create_store_engine(store_url))
    yield opened
    opened.close()


def ready_version(store: Store, model: str = "mlp") -> int:
    header = registry_pb2.CreateModelVersionRequest.Header(
        model_name=model, config_pbtxt=CONFIG, artifact_filename="model.pt", artifact_sha256=SHA
    )
    version = store.begin_version(header, signature_from_config(CONFIG))
    store.complete_version(model, version, SHA, 10)
    return version


def variant(version: int, name: str = "main") -> deployments_pb2.Variant:
    return deployments_pb2.Variant(name=name, model_name="mlp", version=version, weight=1)


def test_calls_inside_a_transaction_commit_together_and_an_error_keeps_none(store: Store) -> None:
    store.create_model("mlp", "", {})
    first, second = ready_version(store), ready_version(store)
    store.deploy("search", [variant(first)], "alice")

    class Refused(Exception):
        pass

    with pytest.raises(Refused), store.transaction():
        store.deploy("search", [variant(second)], "alice")
        store.set_flag("search", "colour", "blue", "alice")
        assert store.get_deployment("search").flags == {"colour": "blue"}  # reads see the block's writes
        raise Refused
    unchanged = store.get_deployment("search")
    assert unchanged.variants[0].version == first and dict(unchanged.flags) == {}

    with store.transaction() as connection:
        assert connection is not None
        store.deploy("search", [variant(second)], "alice")
        with store.transaction():  # nested: joins the outer one
            store.set_flag("search", "colour", "blue", "alice")
    changed = store.get_deployment("search")
    assert changed.variants[0].version == second and dict(changed.flags) == {"colour": "blue"}


def test_every_change_to_what_data_planes_serve_bumps_the_revision_in_its_own_transaction(store: Store) -> None:
    store.create_model("mlp", "", {})
    first, second = ready_version(store), ready_version(store)
    announced: list[int] = []
    store.add_revision_listener(announced.append)

    store.set_alias("mlp", "champion", first)  # no endpoint follows it: what data planes serve is unchanged
    assert store.current_revision() == 0 and announced == []
    store.deploy("search", [deployments_pb2.Variant(name="main", model_name="mlp", alias="champion", weight=1)], "a")
    store.set_flag("search", "colour", "blue", "a")
    store.set_alias("mlp", "champion", second)  # followed: the endpoint now serves another version
    store.set_alias("mlp", "champion", second)  # not moved: nothing to tell
    store.apply_features("# no features\n", "a")  # the desired state carries the definitions
    assert store.current_revision() == 4 and announced == [1, 2, 3, 4]
    assert store.desired_state().endpoints[0].variants[0].model.version == second

    with pytest.raises(RuntimeError), store.transaction():
        store.set_flag("search", "colour", "red", "a")
        raise RuntimeError("the change's unit of work fails after the bump")
    assert store.current_revision() == 4 and announced == [1, 2, 3, 4]  # rolled back: never announced

    with store.transaction():
        store.set_flag("search", "colour", "red", "a")
        store.set_flag("search", "size", "xl", "a")
        assert announced == [1, 2, 3, 4]  # not before the commit
    assert announced == [1, 2, 3, 4, 6]
    store.undeploy("search")
    assert store.current_revision() == 7 and announced[-1] == 7


def test_postgresql_data_planes_hear_of_a_revision_only_when_its_transaction_commits(store: Store) -> None:
    if store.engine.dialect.name != "postgresql":
        pytest.skip("LISTEN/NOTIFY is PostgreSQL's")
    import psycopg

    store.create_model("mlp", "", {})
    version = ready_version(store)
    url = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(url, autocommit=True) as listener:
        listener.execute(f"LISTEN {REVISION_CHANNEL}")
        with pytest.raises(RuntimeError), store.transaction():
            store.deploy("search", [variant(version)], "alice")
            raise RuntimeError("rolled back")
        store.deploy("search", [variant(version)], "alice")
        heard = [note.payload for note in listener.notifies(timeout=5, stop_after=1)]
        assert heard == [str(store.current_revision())]


def test_a_unit_of_work_that_meets_a_postgresql_deadlock_is_rerun_not_failed(store: Store) -> None:
    """Changes that bump the revision queue on its row; others (here: two models' descriptions,
    written in opposite orders) can deadlock, and PostgreSQL fails one of them: it is rerun."""
    if store.engine.dialect.name != "postgresql":
        pytest.skip("SQLite serialises writers from the start (BEGIN IMMEDIATE): no deadlock to meet")
    for name in ("left", "right"):
        store.create_model(name, "", {})
    both_hold_one = threading.Barrier(2)
    attempts: list[str] = []
    errors: list[Exception] = []

    def change(first: str, second: str) -> None:
        def work(_connection: object) -> None:
            rerun = first in attempts
            attempts.append(first)
            store.update_model(first, f"by {first}", {}, [])  # locks the first model's row
            if not rerun:  # first attempts: each holds one row, then wants the other's
                both_hold_one.wait(timeout=30)
            store.update_model(second, f"by {first}", {}, [])

        try:
            store.atomically(work)
        except Exception as error:
            errors.append(error)

    threads = [threading.Thread(target=change, args=pair) for pair in (("left", "right"), ("right", "left"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    # PostgreSQL broke the deadlock by failing one; that one ran again (a rerun can meet the other once more)
    assert len(attempts) >= 3
    assert store.get_model("left").description == store.get_model("right").description
