"""The torch backend's Triton conventions: argument order, output matching, formats, refusals."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from weir.backends.torch_backend import TorchBackend, find_model_file
from weir.errors import InternalError, ModelConfigError, ModelLoadError
from weir.model_config import normalize_config, parse_config_text, signature_of


class Subtract(torch.nn.Module):
    def forward(self, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
        return first - second


class NamedOutputs(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"double": x * 2, "negated": -x}


def signature(text: str):  # type: ignore[no-untyped-def]
    return signature_of(normalize_config(parse_config_text(text, "test"), "model"))


def save_script(module: torch.nn.Module, path: Path) -> Path:
    torch.jit.save(torch.jit.script(module), str(path))
    return path


TWO_INPUTS = """
max_batch_size: 4
input [ {{ name: "{a}" data_type: TYPE_FP32 dims: [ 1 ] }}, {{ name: "{b}" data_type: TYPE_FP32 dims: [ 1 ] }} ]
output [ {{ name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 1 ] }} ]
"""


@pytest.mark.parametrize(
    ("first_listed", "second_listed", "expected"),
    [
        ("a", "b", 7.0),  # plain names: config order -> forward(a, b) = 10 - 3
        ("INPUT__1", "INPUT__0", -7.0),  # Triton's NAME__<index>: forward(INPUT__0, INPUT__1) = 3 - 10
    ],
)
def test_inputs_reach_forward_in_config_order_or_by_index_suffix(
    tmp_path: Path, first_listed: str, second_listed: str, expected: float
) -> None:
    backend = TorchBackend(
        save_script(Subtract(), tmp_path / "model.pt"), signature(TWO_INPUTS.format(a=first_listed, b=second_listed))
    )
    inputs = {first_listed: np.array([[10.0]], np.float32), second_listed: np.array([[3.0]], np.float32)}
    outputs = backend.infer(inputs, ["OUTPUT__0"])
    np.testing.assert_array_equal(outputs["OUTPUT__0"], [[expected]])


def test_a_dict_returning_model_is_matched_by_output_name(tmp_path: Path) -> None:
    text = """
    max_batch_size: 4
    input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ]
    output [ { name: "negated" data_type: TYPE_FP32 dims: [ 2 ] }, { name: "double" data_type: TYPE_FP32 dims: [ 2 ] } ]
    """
    backend = TorchBackend(save_script(NamedOutputs(), tmp_path / "model.pt"), signature(text))
    outputs = backend.infer({"x": np.array([[1.0, 2.0]], np.float32)}, ["double"])
    assert list(outputs) == ["double"]
    np.testing.assert_array_equal(outputs["double"], [[2.0, 4.0]])


def test_an_output_dtype_other_than_the_configs_is_an_internal_error_naming_it(tmp_path: Path) -> None:
    text = """
    max_batch_size: 4
    input [ { name: "first" data_type: TYPE_FP32 dims: [ 1 ] }, { name: "second" data_type: TYPE_FP32 dims: [ 1 ] } ]
    output [ { name: "y" data_type: TYPE_INT64 dims: [ 1 ] } ]
    """
    backend = TorchBackend(save_script(Subtract(), tmp_path / "model.pt"), signature(text))
    with pytest.raises(InternalError) as caught:
        backend.infer({"first": np.ones((1, 1), np.float32), "second": np.ones((1, 1), np.float32)}, ["y"])
    assert "output 'y'" in caught.value.message and "INT64" in caught.value.message


def test_pickled_modules_and_state_dicts_are_refused(tmp_path: Path) -> None:
    text = """
    max_batch_size: 4
    input [ { name: "first" data_type: TYPE_FP32 dims: [ 1 ] }, { name: "second" data_type: TYPE_FP32 dims: [ 1 ] } ]
    output [ { name: "y" data_type: TYPE_FP32 dims: [ 1 ] } ]
    """
    torch.save(Subtract(), tmp_path / "module.pt")
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "state.pt")
    torch.save(Subtract(), tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    for name in ("module.pt", "state.pt", "legacy.pt"):
        with pytest.raises(ModelLoadError) as caught:
            TorchBackend(tmp_path / name, signature(text))
        assert "refusing to load a pickled Python object" in caught.value.message


def test_random_bytes_are_not_an_archive_rather_than_a_pickle(tmp_path: Path) -> None:
    """Finding 9: random bytes were reported as "refusing to load a pickled Python object"."""
    (tmp_path / "garbage.pt").write_bytes(b"not a model")
    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (tmp_path / "plain.zip.pt").write_bytes(zip_members({"a/readme.txt": b"hello"}))
    for name in ("garbage.pt", "random.pt", "plain.zip.pt"):
        with pytest.raises(ModelLoadError) as caught:
            TorchBackend(tmp_path / name, signature(SCALE_CONFIG))
        assert "not a TorchScript/torch.export archive" in caught.value.message
        assert "pickled" not in caught.value.message


# --- hostile artifacts: a pickle that would create a marker file if anything unpickled it ------------


class CreatesMarker:
    """Unpickling this creates ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return (Path.touch, (Path(self.marker),))


class Scale(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((3,), 2.0))
        self.register_buffer("offset", torch.ones(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight + self.offset


SCALE_CONFIG = """
max_batch_size: 4
input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""


def zip_members(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _torch_save_bytes(value: object) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def exported_members() -> dict[str, bytes]:
    """The members of a genuine torch.export.save archive of ``Scale``, in order."""
    buffer = io.BytesIO()
    batch = torch.export.Dim("batch", min=1, max=4)
    torch.export.save(torch.export.export(Scale(), (torch.ones(2, 3),), dynamic_shapes=({0: batch},)), buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


def hostile_export(path: Path, marker: Path, how: str = "weight") -> Path:
    """A torch.export archive that runs code (creates ``marker``) when torch.export.load reads it:
    ``weight`` marks a weight use_pickle (read with weights_only=False), ``sample_inputs`` replaces the
    sample inputs (weights_only=True fails, torch falls back to weights_only=False), ``constant`` adds
    an opaque-object constant (pickle.loads), ``legacy`` adds a legacy pickled state dict."""
    members = exported_members()
    root = next(iter(members)).split("/")[0]
    payload = _torch_save_bytes(CreatesMarker(marker))
    if how == "weight":
        config_name = f"{root}/data/weights/model_weights_config.json"
        config = json.loads(members[config_name])
        entry = config["config"]["weight"]
        entry["use_pickle"] = True
        members[config_name] = json.dumps(config).encode()
        members[f"{root}/data/weights/{entry['path_name']}"] = payload
    elif how == "sample_inputs":
        members[f"{root}/data/sample_inputs/model.pt"] = _torch_save_bytes(((CreatesMarker(marker),), {}))
    elif how == "constant":
        config_name = f"{root}/data/constants/model_constants_config.json"
        config = json.loads(members[config_name])
        config["config"]["hostile"] = {"path_name": "opaque_obj_0", "is_param": False, "use_pickle": False}
        members[config_name] = json.dumps(config).encode()
        members[f"{root}/data/constants/opaque_obj_0"] = pickle.dumps(CreatesMarker(marker))
    elif how == "legacy":
        members[f"{root}/data/weights/model.pt"] = payload
    else:
        raise ValueError(how)
    path.write_bytes(zip_members(members))
    return path


def test_a_genuine_export_archive_loads_and_serves(tmp_path: Path) -> None:
    path = tmp_path / "model.pt2"
    path.write_bytes(zip_members(exported_members()))
    backend = TorchBackend(path, signature(SCALE_CONFIG))
    out = backend.infer({"INPUT__0": np.ones((2, 3), np.float32)}, ["OUTPUT__0"])["OUTPUT__0"]
    np.testing.assert_allclose(out, np.full((2, 3), 3.0))


@pytest.mark.parametrize("how", ["weight", "sample_inputs", "constant", "legacy"])
def test_pickled_payloads_in_an_export_archive_are_refused_without_running_them(tmp_path: Path, how: str) -> None:
    """Finding 10: torch.export.load unpickled a use_pickle weight with weights_only=False."""
    marker = tmp_path / "marker"
    path = hostile_export(tmp_path / "model.pt2", marker, how)
    with pytest.raises(ModelLoadError) as caught:
        TorchBackend(path, signature(SCALE_CONFIG))
    assert "refusing a torch.export archive" in caught.value.message or "refusing a pickle" in caught.value.message
    assert not marker.exists()


def test_the_hostile_archives_do_run_code_when_torch_loads_them(tmp_path: Path) -> None:
    """The archives above are real attacks: torch itself creates the marker (in a child process)."""
    for how in ("weight", "sample_inputs"):
        marker = tmp_path / f"marker-{how}"
        path = hostile_export(tmp_path / f"{how}.pt2", marker, how)
        script = f"import torch\ntry:\n    torch.export.load({str(path)!r})\nexcept Exception:\n    pass\n"
        subprocess.run([sys.executable, "-c", script], check=True, timeout=300, capture_output=True)
        assert marker.exists(), how


def test_torchscript_with_an_extra_pickle_member_is_refused(tmp_path: Path) -> None:
    scripted = save_script(Scale(), tmp_path / "scripted.pt")
    with zipfile.ZipFile(scripted) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    root = next(iter(members)).split("/")[0]
    members[f"{root}/extra.pkl"] = pickle.dumps(CreatesMarker(tmp_path / "marker"))
    (tmp_path / "model.pt").write_bytes(zip_members(members))
    with pytest.raises(ModelLoadError) as caught:
        TorchBackend(tmp_path / "model.pt", signature(SCALE_CONFIG))
    assert "extra pickle member" in caught.value.message
    traced = tmp_path / "traced.pt"
    torch.jit.save(torch.jit.trace(Scale(), torch.ones(2, 3)), str(traced))  # traced_inputs.pkl is TorchScript's
    assert TorchBackend(traced, signature(SCALE_CONFIG)).infer({"INPUT__0": np.ones((1, 3), np.float32)}, ["OUTPUT__0"])


def test_model_files_resolve_inside_the_model_directory(tmp_path: Path) -> None:
    """Finding 4: default_model_filename with an absolute path or '..' served a model from elsewhere."""
    outside = save_script(Scale(), tmp_path / "outside.pt")
    version_dir = tmp_path / "model" / "1"
    version_dir.mkdir(parents=True)
    for name in (str(outside), "../../outside.pt", "../1/model.pt", "sub/model.pt"):
        with pytest.raises(ModelLoadError) as caught:
            find_model_file(version_dir, name)
        assert "default_model_filename" in caught.value.message
    (version_dir / "model.pt").symlink_to(outside)
    with pytest.raises(ModelConfigError) as symlinked:
        find_model_file(version_dir, "")
    assert "resolves outside" in symlinked.value.message


def test_find_model_file_prefers_the_configured_name_then_pt_then_pt2(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError) as caught:
        find_model_file(tmp_path, "")
    assert "model.pt or model.pt2" in caught.value.message
    (tmp_path / "model.pt2").write_bytes(b"")
    assert find_model_file(tmp_path, "").name == "model.pt2"
    (tmp_path / "model.pt").write_bytes(b"")
    assert find_model_file(tmp_path, "").name == "model.pt"
    (tmp_path / "custom.bin").write_bytes(b"")
    assert find_model_file(tmp_path, "custom.bin").name == "custom.bin"
