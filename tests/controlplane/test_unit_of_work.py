"""One unit of work per change: Store.transaction() joins every store call made inside it on the
same thread, commits them together, and on an exception keeps none (SQLite and PostgreSQL)."""

from __future__ import annotations

import pytest

from weir_control.model_config import signature_from_config
from weir_control.store import Store
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
