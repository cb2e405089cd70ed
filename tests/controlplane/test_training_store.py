"""Training jobs in the store, on SQLite and PostgreSQL: idempotent inserts, terminal states that never
change, list filters with exact keyset paging, metric points in order and the sweep siblings' values."""

from __future__ import annotations

import pytest

from weir_control.store.store import Store, create_store_engine
from weir_proto.control.v1 import training_pb2
from weir_proto.errors import InvalidArgumentError, NotFoundError

Job = training_pb2.Job


@pytest.fixture
def store(store_url: str):  # type: ignore[no-untyped-def]
    opened = Store(create_store_engine(store_url))
    yield opened
    opened.close()


def new_job(job_id: str, kind: str = "job", parent: str = "") -> Job:
    return Job(id=job_id, kind=kind, parent_id=parent, state=Job.QUEUED)


def test_an_id_is_taken_once_and_a_terminal_state_never_changes(store: Store) -> None:
    first, created = store.insert_job(new_job("a"), "digest")
    assert created and first.created_at.seconds > 0
    again, created = store.insert_job(Job(id="a", kind="job", state=Job.RUNNING), "other")
    assert not created and again == first and store.job_process("a") == (0, "digest")
    store.update_job("a", lambda job: setattr(job, "state", Job.RUNNING), pid=4242)
    assert store.job_process("a")[0] == 4242
    store.update_job("a", lambda job: setattr(job, "state", Job.CANCELLED))
    calls = []
    unchanged = store.update_job("a", lambda job: calls.append(job) or setattr(job, "state", Job.SUCCEEDED))
    assert unchanged.state == Job.CANCELLED and not calls
    with pytest.raises(InvalidArgumentError, match=r"^id:"):
        store.insert_job(new_job("../escape"), "")
    with pytest.raises(NotFoundError, match="no training job 'ghost'"):
        store.get_job("ghost")


def test_listing_filters_and_pages_exactly(store: Store) -> None:
    for index in range(7):
        store.insert_job(new_job(f"job-{index}"), "")
    store.insert_job(new_job("sweep", kind="sweep"), "")
    for index in range(3):
        store.insert_job(new_job(f"sweep.trial-{index}", kind="trial", parent="sweep"), "")
    store.update_job("job-3", lambda job: setattr(job, "state", Job.FAILED))
    seen: list[str] = []
    token = ""
    while True:
        page, token = store.list_jobs(training_pb2.ListJobsRequest(kind="job", page_size=3, page_token=token))
        seen += [job.id for job in page]
        if not token:
            break
    assert seen == [f"job-{index}" for index in reversed(range(7))]  # newest first, each once
    failed, _ = store.list_jobs(training_pb2.ListJobsRequest(state=Job.FAILED))
    assert [job.id for job in failed] == ["job-3"]
    trials, _ = store.list_jobs(training_pb2.ListJobsRequest(parent_id="sweep"))
    assert sorted(job.id for job in trials) == ["sweep.trial-0", "sweep.trial-1", "sweep.trial-2"]
    assert [job.id for job in store.jobs_in_states(Job.QUEUED)][:2] == ["job-0", "job-1"]  # the queue: oldest first


def test_metrics_come_back_in_order_and_siblings_report_their_latest_value(store: Store) -> None:
    store.insert_job(new_job("s", kind="sweep"), "")
    for trial in ("s.trial-0", "s.trial-1", "s.trial-2"):
        store.insert_job(new_job(trial, kind="trial", parent="s"), "")
    for step in range(3):
        store.append_metrics("s.trial-0", [training_pb2.MetricPoint(key="loss", step=step, value=1.0 / (step + 1))])
    store.append_metrics("s.trial-1", [training_pb2.MetricPoint(key="loss", step=1, value=0.9)])
    store.append_metrics("s.trial-1", [training_pb2.MetricPoint(key="loss", step=1, value=0.8)])  # a retry
    points = store.job_metrics("s.trial-0")
    assert [(point.step, point.value) for _, point in points] == [(0, 1.0), (1, 0.5), (2, 1 / 3)]
    assert store.job_metrics("s.trial-0", after_id=points[1][0])[0][1].step == 2
    assert sorted(store.sibling_metrics("s", "loss", 1, exclude="s.trial-2")) == [0.5, 0.8]


def test_a_retraining_spec_is_the_earlier_jobs_with_its_code_packed_again(store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    import io
    import tarfile

    from weir_control.artifacts import ArtifactStore
    from weir_control.training.runner import JobRunner, code_hash

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, text in (("train.py", b"print('hi')\n"), ("lib/util.py", b"X = 1\n")):
            info = tarfile.TarInfo(name)
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
    spec = training_pb2.JobSpec(entrypoint="script:train.py", code_archive=buffer.getvalue(), max_retries=2)
    spec.parameters["lr"].number = 0.1
    runner = JobRunner(store, ArtifactStore(tmp_path / "artifacts"), tmp_path / "jobs")
    first = runner.submit("first", spec, "ci")  # queued only: the runner is not started
    again = runner.spec_like("first")
    assert code_hash(again.code_archive) == first.code_hash == code_hash(spec.code_archive)
    assert again.parameters["lr"].number == 0.1 and again.max_retries == 2 and again.entrypoint == "script:train.py"
