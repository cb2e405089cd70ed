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


# --- hostile code archives: refused in full before anything is stored ------------------------------

BOMB_UNPACKED = 320 * 1024 * 1024  # past the 256 MiB bound


def tar_of(*members: tuple, compress: bool = True) -> bytes:  # type: ignore[type-arg]
    """(name, kind, payload) members: kind 'file' (payload bytes), 'dir', 'symlink'/'hardlink' (payload
    the target), 'chr', 'fifo'."""
    import io
    import tarfile

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz" if compress else "w") as tar:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            types = {"dir": tarfile.DIRTYPE, "symlink": tarfile.SYMTYPE, "hardlink": tarfile.LNKTYPE,
                     "chr": tarfile.CHRTYPE, "fifo": tarfile.FIFOTYPE}  # fmt: skip
            if kind == "file":
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = types[kind]
            if kind in ("symlink", "hardlink"):
                info.linkname = payload
            tar.addfile(info)
    return buffer.getvalue()


def gzip_bomb(unpacked: int) -> bytes:
    """A tar.gz of one member of ``unpacked`` zero bytes, built without holding it (about 1000:1)."""
    import tarfile
    import zlib

    info = tarfile.TarInfo("train.py")
    info.size = unpacked
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)  # gzip framing
    parts = [compressor.compress(info.tobuf())]
    zeros = bytes(1 << 20)
    for _ in range(unpacked >> 20):
        parts.append(compressor.compress(zeros))
    parts.append(compressor.compress(bytes(1024)))  # the end-of-archive blocks
    parts.append(compressor.flush())
    return b"".join(parts)


HOSTILE = {
    "dot-dot": ((("train.py", "file", b"x=1\n"), ("../escape.py", "file", b"x=1\n")), "'../escape.py'", "'..'"),
    "absolute": ((("/etc/weir-owned", "file", b"x\n"),), "'/etc/weir-owned'", "absolute"),
    "symlink-out": ((("train.py", "file", b"x=1\n"), ("tokens", "symlink", "/etc/shadow")), "'tokens'",
                    "symbolic link"),
    "symlink-in-then-through": ((("link", "symlink", "."), ("link/train.py", "file", b"x\n")), "'link'",
                                "symbolic link"),
    "hardlink-out": ((("train.py", "file", b"x=1\n"), ("db", "hardlink", "/etc/passwd")), "'db'", "hard link"),
    "device": ((("train.py", "file", b"x=1\n"), ("null", "chr", None)), "'null'", "a device"),
    "fifo": ((("train.py", "file", b"x=1\n"), ("pipe", "fifo", None)), "'pipe'", "a fifo"),
    "twice": ((("train.py", "file", b"x=1\n"), ("./train.py", "file", b"import os\n")), "'./train.py'", "twice"),
}  # fmt: skip


def runner_on(store: Store, tmp_path):  # type: ignore[no-untyped-def]
    from weir_control.artifacts import ArtifactStore
    from weir_control.training.runner import JobRunner

    return JobRunner(store, ArtifactStore(tmp_path / "artifacts"), tmp_path / "jobs")


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_a_hostile_archive_is_refused_naming_the_member_and_nothing_is_stored(store: Store, tmp_path, case) -> None:  # type: ignore[no-untyped-def]
    members, member, why = HOSTILE[case]
    runner = runner_on(store, tmp_path)
    spec = training_pb2.JobSpec(entrypoint="script:train.py", code_archive=tar_of(*members))
    with pytest.raises(InvalidArgumentError) as refused:
        runner.submit("hostile", spec, "ci")
    message = refused.value.message
    assert message.startswith("spec.code_archive: member ") and member in message and why in message, message
    with pytest.raises(NotFoundError):
        store.get_job("hostile")
    assert not (tmp_path / "jobs" / "hostile").exists()
    with pytest.raises(InvalidArgumentError):  # a sweep's template is checked the same way
        runner.submit_sweep("hostile-sweep", training_pb2.SweepSpec(template=spec, metric="loss"), "ci")
    with pytest.raises(NotFoundError):
        store.get_job("hostile-sweep")


def test_too_many_members_and_unreadable_bytes_are_refused(store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from weir_control.training.archive import MAX_MEMBERS

    runner = runner_on(store, tmp_path)
    many = tar_of(*((f"m/{index}.py", "file", b"") for index in range(MAX_MEMBERS + 1)))
    for archive, expected in ((many, f"at most {MAX_MEMBERS} members"), (b"\x1f\x8bnot gzip", "unreadable bytes")):
        spec = training_pb2.JobSpec(entrypoint="script:train.py", code_archive=archive)
        with pytest.raises(InvalidArgumentError) as refused:
            runner.submit("refused", spec, "ci")
        assert refused.value.message.startswith("spec.code_archive: ") and expected in refused.value.message
        with pytest.raises(NotFoundError):
            store.get_job("refused")


def test_an_accepted_archive_unpacks_its_files_only_and_hashes_the_same_however_packed(store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from weir_control.training.runner import code_hash

    members = (("./train.py", "file", b"print(1)\n"), ("pkg", "dir", None), ("pkg/util.py", "file", b"X = 2\n"))
    packed = tar_of(*members)
    plain = tar_of(*reversed(members), compress=False)
    assert code_hash(packed) == code_hash(plain) != code_hash(tar_of(("train.py", "file", b"print(2)\n")))
    job = runner_on(store, tmp_path).submit("fine", training_pb2.JobSpec(entrypoint="script:train.py",
                                                                       code_archive=packed), "ci")  # fmt: skip
    code = tmp_path / "jobs" / "fine" / "code"
    assert job.code_hash == code_hash(packed)
    assert (code / "train.py").read_bytes() == b"print(1)\n" and (code / "pkg" / "util.py").read_bytes() == b"X = 2\n"


def test_a_gzip_bomb_is_refused_within_bounded_memory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Checked in a subprocess whose address space is capped below what the bomb inflates to: holding it
    would raise MemoryError there; streaming it refuses it with the unpacked-size message."""
    import subprocess
    import sys

    bomb = tmp_path / "bomb.tar.gz"
    bomb.write_bytes(gzip_bomb(BOMB_UNPACKED))
    assert bomb.stat().st_size < 1024 * 1024
    script = f"""
import resource, sys
from pathlib import Path
from weir_control.training.archive import check_archive
from weir_proto.errors import InvalidArgumentError
data = Path({str(bomb)!r}).read_bytes()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
resource.setrlimit(resource.RLIMIT_AS, (200 * 1024 * 1024, 200 * 1024 * 1024))
try:
    check_archive(data)
except InvalidArgumentError as error:
    print(error.message)
    print("grew-kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before)
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    message, grew = result.stdout.splitlines()
    assert message.startswith("spec.code_archive: expected at most 268435456 bytes unpacked"), message
    assert int(grew.split()[1]) < 32 * 1024  # KiB: a few chunks, not the 320 MiB it inflates to


def test_a_crafted_checkpoint_is_not_unpickled(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A checkpoint holding a pickled object (here one whose unpickling would create a file) is refused
    by load_checkpoint without running it."""
    import os
    import pickle

    from weir_control import tracking

    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.mkdir, (str(marker),))

    monkeypatch.setenv(tracking.ENV_JOB_DIR, str(tmp_path / "job"))
    run = tracking.init()
    (run.checkpoint_dir / "checkpoint-000001.pt").write_bytes(pickle.dumps({"epoch": Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        run.load_checkpoint()
    assert not marker.exists()
    run.save_checkpoint({"epoch": 3, "weights": __import__("torch").ones(2), "best": {"loss": 0.5}})
    assert run.load_checkpoint()["epoch"] == 3  # type: ignore[index]


# --- the control plane reads a job's directory without following what the job put there ----------------


def test_files_in_a_job_directory_are_opened_without_following_links_or_blocking(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os

    from weir_control.training.jobfiles import read_inside

    secret = tmp_path / "tokens.toml"
    secret.write_text("t-admin")
    job_dir = tmp_path / "job"
    (job_dir / "output").mkdir(parents=True)
    (job_dir / "job.log").symlink_to(secret)
    (job_dir / "linked").symlink_to(tmp_path)  # a directory link halfway down a path
    os.mkfifo(job_dir / "output" / "metrics.json")  # opening it for reading would block
    (job_dir / "output" / "model.pt").write_bytes(b"weights")
    for relative in ("job.log", "linked/tokens.toml", "output/metrics.json", "../tokens.toml"):
        with pytest.raises(OSError):
            read_inside(job_dir, relative, 100)
    assert read_inside(job_dir, "output/model.pt", 100) == b"weights"


def test_packing_a_jobs_code_again_leaves_links_out_and_registration_refuses_a_linked_model(
    store: Store, tmp_path
) -> None:  # type: ignore[no-untyped-def]
    import io
    import tarfile

    from weir_control.artifacts import ArtifactStore
    from weir_control.training.registration import register_job_output
    from weir_control.training.runner import archive_directory
    from weir_proto.errors import FailedPreconditionError

    secret = tmp_path / "control.db"
    secret.write_text("the control plane's database")
    code = tmp_path / "job" / "code"
    code.mkdir(parents=True)
    (code / "train.py").write_text("print(1)\n")
    (code / "data.db").symlink_to(secret)
    with tarfile.open(fileobj=io.BytesIO(archive_directory(code, follow_links=False))) as tar:
        assert tar.getnames() == ["train.py"]
    output = tmp_path / "job" / "output"
    output.mkdir()
    (output / "model.pt").symlink_to(secret)
    (output / "config.pbtxt").write_text('name: "m"\n')
    job = Job(id="linked", kind="job", state=Job.SUCCEEDED)
    job.spec.register.model_name = "m"
    with pytest.raises(FailedPreconditionError) as refused:
        register_job_output(store, ArtifactStore(tmp_path / "artifacts"), job, tmp_path / "job")
    assert "output/model.pt" in refused.value.message and "regular file" in refused.value.message


def test_a_job_settled_again_after_a_handover_registers_its_output_once(store: Store, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # A lease holder killed after registering a job's output, before recording the job's end: the
    # next holder settles the job again and must find the version, not register a second one.
    import torch

    from tests.e2e.test_control_plane import CONFIG, Scale
    from weir_control.artifacts import ArtifactStore
    from weir_control.training.registration import register_job_output
    from weir_proto.control.v1 import audit_pb2

    output = tmp_path / "job" / "output"
    output.mkdir(parents=True)
    torch.jit.save(torch.jit.script(Scale(2.0)), str(output / "model.pt"))
    (output / "config.pbtxt").write_text(CONFIG)
    job = Job(id="settled-twice", kind="job", state=Job.SUCCEEDED)
    job.spec.register.model_name = "scale"
    job.spec.register.aliases.append("champion")
    artifacts = ArtifactStore(tmp_path / "artifacts")
    first = register_job_output(store, artifacts, job, tmp_path / "job")
    again = register_job_output(store, artifacts, job, tmp_path / "job")
    assert again.version == first.version
    versions, _ = store.search_versions("scale", 0, {}, 100, "")
    assert [version.version for version in versions] == [first.version]
    assert store.get_version_by_alias("scale", "champion").version == first.version
    events, _ = store.list_audit(audit_pb2.ListAuditEventsRequest(page_size=100))
    actions = sorted(event.action for event in events)
    assert actions == ["Registry/SetAlias", "Training/RegisterModelVersion"]
