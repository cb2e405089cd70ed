"""The inference protos: committed generated files are current, the wire format matches Triton's
field for field, and Weir's copy stays out of protobuf's default descriptor pool."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor

ROOT = Path(__file__).resolve().parents[2]
GENERATED = [
    "weir_proto/inference/grpc_service_pb2.pyi",
    "weir_proto/inference/model_config_pb2.pyi",
    "weir_proto/inference/inference_descriptors.binpb",
    *(
        f"weir_proto/{package}/v1/{name}{suffix}"
        for package, names in (
            ("common", ["types"]),
            (
                "control",
                ["registry", "deployments", "audit", "rollouts", "experiments", "features", "training", "monitoring"],
            ),
        )
        for name in names
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
    ),
]
REQUIRED_RPCS = [
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "ModelConfig",
    "ModelStatistics",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
]


def test_committed_generated_code_is_what_the_generator_produces(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)], check=True)
    for relative in GENERATED:
        committed = (ROOT / "protos" / relative).read_bytes()
        regenerated = (tmp_path / relative).read_bytes()
        assert committed == regenerated, f"{relative} is stale: run `make protos` and commit the result"


def _field_signature(field: FieldDescriptor) -> tuple[object, ...]:
    referenced = field.message_type or field.enum_type
    return (field.name, field.type, field.is_repeated, referenced.full_name if referenced else None)


def _compare_messages(ours: Descriptor, theirs: Descriptor, differences: list[str]) -> None:
    our_fields = {field.number: _field_signature(field) for field in ours.fields}
    their_fields = {field.number: _field_signature(field) for field in theirs.fields}
    if our_fields != their_fields:
        differences.append(f"{ours.full_name}: ours {our_fields} != Triton's {their_fields}")
    their_nested = {nested.name: nested for nested in theirs.nested_types}
    for nested in ours.nested_types:
        if nested.name not in their_nested:
            differences.append(f"{nested.full_name}: Triton has no such message")
        else:
            _compare_messages(nested, their_nested[nested.name], differences)


@pytest.mark.parametrize("file_name", ["grpc_service", "model_config"])
def test_every_message_matches_tritons_field_numbers_and_types(file_name: str) -> None:
    from tritonclient.grpc import model_config_pb2, service_pb2

    from weir_proto.inference import pool

    theirs = {"grpc_service": service_pb2, "model_config": model_config_pb2}[file_name].DESCRIPTOR
    ours = pool.POOL.FindFileByName(f"weir_proto/inference/{file_name}.proto")
    differences: list[str] = []
    for name, message in ours.message_types_by_name.items():
        assert name in theirs.message_types_by_name, f"Triton has no message {name}"
        _compare_messages(message, theirs.message_types_by_name[name], differences)
    for name, enum in ours.enum_types_by_name.items():
        their_values = {value.name: value.number for value in theirs.enum_types_by_name[name].values}
        assert {value.name: value.number for value in enum.values} == their_values
    assert differences == []
    if file_name == "model_config":
        # The whole Triton schema is declared, so any Triton config.pbtxt parses.
        assert set(ours.message_types_by_name) == set(theirs.message_types_by_name)


def test_service_has_the_required_rpcs_with_tritons_paths_and_types() -> None:
    from tritonclient.grpc import service_pb2

    from weir_proto.inference import pool

    theirs = service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    ours = pool.SERVICE
    assert ours.full_name == theirs.full_name == "inference.GRPCInferenceService"
    assert [method.name for method in ours.methods] == REQUIRED_RPCS
    for method in ours.methods:
        their_method = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == their_method.input_type.full_name
        assert method.output_type.full_name == their_method.output_type.full_name
        assert method.client_streaming == their_method.client_streaming
        assert method.server_streaming == their_method.server_streaming


def _run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120, cwd=ROOT
    )


def test_weir_registers_nothing_in_the_default_pool() -> None:
    result = _run_python(
        """
        from google.protobuf import descriptor_pool
        import weir.server, weir.cli
        from weir_proto.inference import messages
        messages.ModelInferRequest(model_name="x").SerializeToString()
        try:
            descriptor_pool.Default().FindMessageTypeByName("inference.ServerLiveRequest")
        except KeyError:
            print("absent")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "absent"


@pytest.mark.parametrize("order", ["weir first", "tritonclient first"])
def test_weir_server_and_tritonclient_share_one_process(order: str, demo_repository_template: Path) -> None:
    imports = ["import weir.server", "import tritonclient.grpc"]
    if order == "tritonclient first":
        imports.reverse()
    result = _run_python(
        "\n".join(imports)
        + f"""
import asyncio, threading
import numpy as np
import tritonclient.grpc as triton
from weir.server import WeirServer
from weir.settings import ServerSettings

async def main():
    server = WeirServer(ServerSettings(model_repository=__import__("pathlib").Path({str(demo_repository_template)!r}),
                                       listen_address="127.0.0.1", grpc_port=0, metrics_port=-1))
    await server.start()
    def call():
        client = triton.InferenceServerClient(f"127.0.0.1:{{server.grpc_port}}")
        tensor = triton.InferInput("INPUT__0", [1, 256], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 256), np.float32))
        return client.infer("mlp_classifier", [tensor]).as_numpy("OUTPUT__0").shape
    print(await asyncio.to_thread(call))
    await server.stop(1)
asyncio.run(main())
"""
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("(1, 10)")


def test_weir_works_beside_another_inference_registration_in_the_default_pool() -> None:
    """kserve and mlserver register their own copy of the V2 protos (under another file name) in
    the default pool; tritonclient then fails to import ("duplicate symbol"). Weir must not."""
    result = _run_python(
        """
        from google.protobuf import descriptor_pb2, descriptor_pool
        from importlib import resources
        files = descriptor_pb2.FileDescriptorSet.FromString(
            resources.files("weir_proto.inference").joinpath("inference_descriptors.binpb").read_bytes()).file
        for file_proto in files:  # the way another library would: same symbols, its own file names
            file_proto.name = "other_library/" + file_proto.name.split("/")[-1]
            file_proto.dependency[:] = ["other_library/" + d.split("/")[-1] for d in file_proto.dependency]
            descriptor_pool.Default().Add(file_proto)
        import weir.server
        from weir_proto.inference import messages
        request = messages.ModelInferRequest(model_name="m", id="1")
        assert messages.ModelInferRequest.FromString(request.SerializeToString()).id == "1"
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "ok"
