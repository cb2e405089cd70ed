"""weir_control.store on SQLite and PostgreSQL: registry, aliases, deployments, audit, paging,
migrations from an older schema, and concurrent version numbering."""

from __future__ import annotations

import threading

import pytest
from sqlalchemy import create_engine, insert, inspect

from weir_control.model_config import signature_from_config
from weir_control.store import Store, migrations, schema
from weir_control.store.store import create_store_engine, now
from weir_proto.control.v1 import audit_pb2, deployments_pb2, registry_pb2
from weir_proto.errors import FailedPreconditionError, InvalidArgumentError, NotFoundError

CONFIG = """
max_batch_size: 8
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 2 ] } ]
"""
SHA = "ab" * 32


def header(model: str = "mlp", **fields: object) -> registry_pb2.CreateModelVersionRequest.Header:
    return registry_pb2.CreateModelVersionRequest.Header(
        model_name=model, config_pbtxt=CONFIG, artifact_filename="model.pt", artifact_sha256=SHA, **fields
    )


def ready_version(store: Store, model: str = "mlp", **fields: object) -> int:
    version = store.begin_version(header(model, **fields), signature_from_config(CONFIG))
    store.complete_version(model, version, SHA, 123)
    return version


@pytest.fixture
def store(store_url: str) -> Store:
    opened = Store(create_store_engine(store_url))
    yield opened
    opened.close()


def test_a_model_and_its_versions_round_trip_with_metadata_and_lineage(store: Store) -> None:
    created = store.create_model("mlp", "a demo", {"team": "search"})
    assert created.name == "mlp" and created.tags == {"team": "search"} and created.latest_version == 0

    lineage = registry_pb2.Lineage(source_job="job-7", parameters={"lr": "0.1"}, dataset_hash="d1", code_version="abc")
    version = store.begin_version(
        header(description="first", tags={"stage": "dev"}, metrics={"accuracy": 0.9}, lineage=lineage),
        signature_from_config(CONFIG),
    )
    pending = store.get_version("mlp", version)
    assert version == 1 and pending.state == registry_pb2.ModelVersion.PENDING and pending.artifact_sha256 == ""

    ready = store.complete_version("mlp", version, SHA, 123)
    assert ready.state == registry_pb2.ModelVersion.READY
    assert (ready.artifact_sha256, ready.artifact_size, ready.artifact_filename) == (SHA, 123, "model.pt")
    assert ready.metrics == {"accuracy": 0.9} and ready.tags == {"stage": "dev"} and ready.description == "first"
    assert ready.lineage == lineage
    assert [spec.name for spec in ready.signature.inputs] == ["INPUT__0"]
    assert list(ready.signature.inputs[0].shape) == [-1, 4]
    assert ready.config_pbtxt == CONFIG
    assert store.get_model("mlp").latest_version == 1


def test_errors_name_what_is_missing_or_wrong(store: Store) -> None:
    with pytest.raises(NotFoundError, match="no registered model named 'ghost'"):
        store.get_model("ghost")
    store.create_model("mlp", "", {})
    with pytest.raises(FailedPreconditionError, match="already exists"):
        store.create_model("mlp", "", {})
    with pytest.raises(NotFoundError, match="has no version 9"):
        store.get_version("mlp", 9)
    with pytest.raises(InvalidArgumentError, match="name: expected 1-128 ASCII letters"):
        store.create_model("a/b", "", {})
    with pytest.raises(InvalidArgumentError, match="page_token"):
        store.search_models("", {}, 10, "not-a-token")


def test_failed_and_interrupted_uploads_never_become_ready(store: Store) -> None:
    store.create_model("mlp", "", {})
    failed = store.begin_version(header(), signature_from_config(CONFIG))
    store.fail_version("mlp", failed, "checksum mismatch")
    interrupted = store.begin_version(header(), signature_from_config(CONFIG))

    assert store.fail_pending_versions("the control plane restarted") == 1
    assert store.get_version("mlp", failed).failure_reason == "checksum mismatch"
    assert store.get_version("mlp", interrupted).state == registry_pb2.ModelVersion.FAILED
    with pytest.raises(FailedPreconditionError, match="expected PENDING"):
        store.complete_version("mlp", interrupted, SHA, 1)
    assert store.get_model("mlp").latest_version == 0


def test_aliases_are_set_moved_and_deleted_and_only_point_at_ready_versions(store: Store) -> None:
    store.create_model("mlp", "", {})
    first, second = ready_version(store), ready_version(store)
    pending = store.begin_version(header(), signature_from_config(CONFIG))

    assert store.set_alias("mlp", "champion", first).aliases == ["champion"]
    assert store.get_version_by_alias("mlp", "champion").version == first
    store.set_alias("mlp", "champion", second)  # moved
    assert store.get_version_by_alias("mlp", "champion").version == second
    assert store.get_version("mlp", first).aliases == []
    assert store.get_model("mlp").aliases == {"champion": second}
    with pytest.raises(FailedPreconditionError, match="expected a READY version"):
        store.set_alias("mlp", "challenger", pending)
    with pytest.raises(InvalidArgumentError, match="not a number"):
        store.set_alias("mlp", "3", first)

    store.delete_alias("mlp", "champion")
    with pytest.raises(NotFoundError, match="no alias 'champion'"):
        store.get_version_by_alias("mlp", "champion")
    with pytest.raises(NotFoundError):
        store.delete_alias("mlp", "champion")


def test_search_filters_by_name_and_tags_and_pages_exactly(store: Store) -> None:
    for index in range(7):
        store.create_model(f"model-{index}", "", {"team": "a" if index % 2 else "b"})
    store.create_model("Other", "", {})

    names, token = [], ""
    while True:
        page, token = store.search_models("MODEL", {}, 3, token)
        names += [model.name for model in page]
        if not token:
            break
    assert names == [f"model-{index}" for index in range(7)]
    team_a, _ = store.search_models("", {"team": "a"}, 0, "")
    assert [model.name for model in team_a] == ["model-1", "model-3", "model-5"]
    percent, _ = store.search_models("%", {}, 0, "")  # LIKE wildcards are matched literally
    assert percent == []


def test_versions_search_by_state_and_tag_across_pages(store: Store) -> None:
    store.create_model("a", "", {})
    store.create_model("b", "", {})
    for model in ("a", "b"):
        for index in range(3):
            ready_version(store, model, tags={"parity": str(index % 2)})
    store.begin_version(header("a"), signature_from_config(CONFIG))  # pending

    keys, token = [], ""
    while True:
        page, token = store.search_versions("", registry_pb2.ModelVersion.READY, {}, 2, token)
        keys += [(version.model_name, version.version) for version in page]
        if not token:
            break
    assert keys == [("a", 1), ("a", 2), ("a", 3), ("b", 1), ("b", 2), ("b", 3)]
    even, _ = store.search_versions("b", 0, {"parity": "0"}, 0, "")
    assert [version.version for version in even] == [1, 3]


def test_concurrent_uploads_get_distinct_version_numbers(store: Store) -> None:
    store.create_model("mlp", "", {})
    numbers: list[int] = []
    errors: list[BaseException] = []

    def upload() -> None:
        try:
            numbers.append(store.begin_version(header(), signature_from_config(CONFIG)))
        except BaseException as error:  # surfaced below
            errors.append(error)

    threads = [threading.Thread(target=upload) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(numbers) == [1, 2, 3, 4, 5, 6]


def test_deployments_resolve_versions_and_aliases_into_the_desired_state(store: Store) -> None:
    store.create_model("mlp", "", {})
    first, second = ready_version(store), ready_version(store)
    store.set_alias("mlp", "champion", first)
    before = store.desired_state().revision

    pinned = deployments_pb2.Variant(name="primary", model_name="mlp", version=second, weight=100)
    following = deployments_pb2.Variant(name="primary", model_name="mlp", alias="champion", weight=100)
    store.deploy("fixed", [pinned], "alice")
    deployment = store.deploy("live", [following], "bob")
    assert deployment.updated_by == "bob" and [ref.version for ref in deployment.resolved] == [first]

    state = store.desired_state()
    assert state.revision == before + 2
    resolved = {endpoint.endpoint: endpoint.variants[0] for endpoint in state.endpoints}
    assert resolved["fixed"].model.version == second and resolved["live"].model.version == first
    assert resolved["live"].artifact_sha256 == SHA and resolved["live"].config_pbtxt == CONFIG

    store.set_alias("mlp", "champion", second)
    assert {endpoint.endpoint: endpoint.variants[0].model.version for endpoint in store.desired_state().endpoints} == {
        "fixed": second,
        "live": second,
    }
    store.undeploy("fixed")
    assert [endpoint.endpoint for endpoint in store.desired_state().endpoints] == ["live"]
    with pytest.raises(NotFoundError, match="nothing is deployed at 'fixed'"):
        store.undeploy("fixed")
    pending = store.begin_version(header(), signature_from_config(CONFIG))
    with pytest.raises(FailedPreconditionError, match="expected a READY version to deploy"):
        store.deploy("live", [deployments_pb2.Variant(name="p", model_name="mlp", version=pending, weight=1)], "bob")
    page, token = store.list_deployments(0, "")
    assert [deployment.endpoint for deployment in page] == ["live"] and token == ""


def test_a_deploy_if_revision_never_overwrites_a_change_made_since(store: Store) -> None:
    """A rollout's step writes only over the revision it read (issue 15, item 3): a hand deploy or an
    undeploy in between is kept, and the step is refused naming what it found."""
    store.create_model("mlp", "", {})
    first, second = ready_version(store), ready_version(store)
    read = store.deploy(
        "e", [deployments_pb2.Variant(name="primary", model_name="mlp", version=first, weight=100)], "a"
    )
    by_hand = store.deploy(
        "e", [deployments_pb2.Variant(name="primary", model_name="mlp", version=second, weight=100)], "b"
    )
    step = [deployments_pb2.Variant(name="primary", model_name="mlp", version=first, weight=100)]
    with pytest.raises(
        FailedPreconditionError, match=rf"expected revision {read.revision}, it is at revision {by_hand.revision}"
    ):
        store.deploy("e", step, "rollout-controller", None, read.revision)
    assert store.get_deployment("e").resolved[0].version == second
    assert store.deploy("e", step, "rollout-controller", None, by_hand.revision).resolved[0].version == first
    store.undeploy("e")
    with pytest.raises(FailedPreconditionError, match="it is undeployed"):
        store.deploy("e", step, "rollout-controller", None, by_hand.revision)
    with pytest.raises(NotFoundError):
        store.get_deployment("e")


def test_the_audit_log_filters_and_pages_newest_first(store: Store) -> None:
    for index in range(5):
        event = audit_pb2.AuditEvent(
            actor="alice" if index % 2 else "bob",
            role="deployer",
            action="Deployments/Deploy",
            target=f"endpoint/e{index}",
            result="OK",
        )
        event.at.FromDatetime(now())
        store.append_audit(event)

    first, token = store.list_audit(audit_pb2.ListAuditEventsRequest(page_size=2))
    second, _ = store.list_audit(audit_pb2.ListAuditEventsRequest(page_size=2, page_token=token))
    assert [event.target for event in first + second] == ["endpoint/e4", "endpoint/e3", "endpoint/e2", "endpoint/e1"]
    alice, _ = store.list_audit(audit_pb2.ListAuditEventsRequest(actor="alice"))
    assert [event.target for event in alice] == ["endpoint/e3", "endpoint/e1"]
    prefixed, _ = store.list_audit(audit_pb2.ListAuditEventsRequest(target_prefix="endpoint/e4"))
    assert len(prefixed) == 1


def test_a_store_made_by_an_older_schema_opens_migrated_with_its_data(store_url: str) -> None:
    engine = create_store_engine(store_url)
    assert migrations.migrate(engine.begin, target=1) == [1]  # what an older Weir created
    with engine.begin() as connection:
        connection.execute(
            insert(schema.REGISTERED_MODELS).values(
                name="old", description="from v1", created_at=now(), updated_at=now()
            )
        )
    engine.dispose()

    store = Store(create_store_engine(store_url))
    try:
        assert store.schema_version_applied == list(range(2, migrations.LATEST + 1))
        assert store.get_model("old").description == "from v1"
        ready_version(store, "old")
        store.deploy("old", [deployments_pb2.Variant(name="p", model_name="old", version=1, weight=1)], "x")
    finally:
        store.close()
    reopened = Store(create_store_engine(store_url))
    assert reopened.schema_version_applied == []  # already current
    reopened.close()


def test_the_migrated_schema_matches_the_tables_the_store_queries(store_url: str) -> None:
    store = Store(create_store_engine(store_url))
    try:
        inspector = inspect(store.engine)
        for table in schema.METADATA.sorted_tables:
            actual = {column["name"] for column in inspector.get_columns(table.name)}
            assert actual == {column.name for column in table.columns}, table.name
    finally:
        store.close()


def test_a_newer_schema_than_this_weir_knows_is_refused(tmp_path) -> None:
    url = f"sqlite:///{tmp_path / 'future.db'}"
    Store(create_store_engine(url)).close()
    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(schema.SCHEMA_VERSION.update().values(version=migrations.LATEST + 1))
    engine.dispose()
    with pytest.raises(RuntimeError, match="newer than this Weir knows"):
        Store(create_store_engine(url))


def test_control_planes_opening_one_empty_store_at_once_migrate_it_once(store_url: str) -> None:
    results: list[object] = []

    def open_it() -> None:
        try:
            store = Store(create_store_engine(store_url))
            results.append(store.schema_version_applied)
            store.close()
        except BaseException as error:  # surfaced below
            results.append(error)

    threads = [threading.Thread(target=open_it) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(isinstance(applied, list) for applied in results), results
    assert sorted(step for applied in results for step in applied) == list(
        range(1, migrations.LATEST + 1)
    )  # each step once


def test_traffic_splits_flags_and_routing_reach_the_desired_state(store: Store) -> None:
    store.create_model("mlp", "", {})
    first, second = ready_version(store), ready_version(store)
    variants = [
        deployments_pb2.Variant(name="canary", model_name="mlp", version=second, weight=10),
        deployments_pb2.Variant(name="stable", model_name="mlp", version=first, weight=90),
    ]
    store.deploy("web", variants, "alice", deployments_pb2.RoutingPolicy(key_header="X-User"))
    flagged = store.set_flag("web", "kill_switch", "stable", "bob")
    assert flagged.flags == {"kill_switch": "stable"} and flagged.routing.key_header == "x-user"

    endpoint = store.desired_state().endpoints[0]
    assert [(v.name, v.model.version, v.weight) for v in endpoint.variants] == [
        ("canary", second, 10),
        ("stable", first, 90),
    ]
    assert endpoint.flags == {"kill_switch": "stable"} and endpoint.routing.key_header == "x-user"

    store.deploy("web", variants[1:], "alice")  # new variants keep the flags and the routing policy
    assert store.get_deployment("web").flags == {"kill_switch": "stable"}
    assert store.set_flag("web", "kill_switch", "", "bob").flags == {}
    with pytest.raises(InvalidArgumentError, match="the kill switch must name a variant"):
        store.set_flag("web", "kill_switch", "canary", "bob")
    with pytest.raises(InvalidArgumentError, match="expected unique names"):
        store.deploy("web", [variants[1], variants[1]], "alice")
    with pytest.raises(
        InvalidArgumentError, match=r"at least one serving \(non-shadow\) variant with a weight above 0"
    ):
        store.deploy("web", [deployments_pb2.Variant(name="s", model_name="mlp", version=first, weight=0)], "a")


def test_schema_step_9_keeps_refusal_outcomes_and_counts(store: Store) -> None:
    from weir_proto.control.v1 import audit_pb2

    store.append_audit(audit_pb2.AuditEvent(actor="a", action="Deployments/Deploy", result="OK"))
    store.append_audit(audit_pb2.AuditEvent(actor="b", action="Deployments/Deploy", result="NOT_FOUND"))
    store.append_audit(
        audit_pb2.AuditEvent(
            actor="c", action="Registry/SetAlias", result="UNAUTHENTICATED", outcome="refused", count=7
        )
    )
    store.append_audit(audit_pb2.AuditEvent(actor="d", action="Registry/SetAlias", result="INTERNAL"))
    events, _ = store.list_audit(audit_pb2.ListAuditEventsRequest())
    assert [(e.actor, e.outcome, e.count) for e in events] == [
        ("d", "failed", 1), ("c", "refused", 7), ("b", "refused", 1), ("a", "ok", 1)
    ]  # fmt: skip
    refused, _ = store.list_audit(audit_pb2.ListAuditEventsRequest(outcome="refused"))
    assert [e.actor for e in refused] == ["c", "b"]


def test_tags_are_bounded(store: Store) -> None:
    with pytest.raises(InvalidArgumentError, match="tags 'k' value: expected at most 4096 characters"):
        store.create_model("mlp", "", {"k": "v" * 5000})
    with pytest.raises(InvalidArgumentError, match="tags: expected at most 64 per call"):
        store.create_model("mlp", "", {f"k{index}": "v" for index in range(65)})
    with pytest.raises(InvalidArgumentError, match="tags key: expected 1-128"):
        store.create_model("mlp", "", {"k" * 200: "v"})
    assert store.create_model("mlp", "", {"k": "v" * 4096}).tags["k"] == "v" * 4096


def test_version_metrics_are_finite_and_descriptions_bounded(store: Store) -> None:
    store.create_model("mlp", "", {})
    header = registry_pb2.CreateModelVersionRequest.Header(
        model_name="mlp", config_pbtxt=CONFIG, artifact_filename="model.pt", artifact_sha256=SHA
    )
    header.metrics["loss"] = float("nan")
    with pytest.raises(InvalidArgumentError, match="metrics 'loss': expected a finite number, got nan"):
        store.begin_version(header, signature_from_config(CONFIG))
    del header.metrics["loss"]
    version = store.begin_version(header, signature_from_config(CONFIG))
    with pytest.raises(InvalidArgumentError, match="metrics 'auc': expected a finite number, got inf"):
        store.update_version("mlp", version, None, {}, [], {"auc": float("inf")})
    with pytest.raises(InvalidArgumentError, match="description: expected at most 65536 characters"):
        store.update_model("mlp", "d" * 70_000, {}, [])
    assert store.update_version("mlp", version, None, {}, [], {"auc": 0.9}).metrics == {"auc": pytest.approx(0.9)}
