"""The torch backend's Triton conventions: argument order, output matching, formats, refusals."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from weir.backends.torch_backend import TorchBackend, find_model_file
from weir.errors import InternalError, ModelLoadError
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
    (tmp_path / "garbage.pt").write_bytes(b"not a model")
    for name in ("module.pt", "state.pt", "garbage.pt"):
        with pytest.raises(ModelLoadError) as caught:
            TorchBackend(tmp_path / name, signature(text))
        assert "refusing to load a pickled Python object" in caught.value.message


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
