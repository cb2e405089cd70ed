"""Warm-up: samples from model_warmup (zero, random, file) or one zero sample, and a version that
fails its warm-up never becomes ready."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from weir.errors import FailedPreconditionError, UnavailableError
from weir.metrics import Metrics
from weir.model_config import normalize_config, parse_config_text, signature_of
from weir.repository import ModelRepository
from weir.warmup import warmup_samples

CONFIG = """
max_batch_size: 8
input [ { name: "x" data_type: TYPE_FP32 dims: [ 3 ] }, { name: "t" data_type: TYPE_STRING dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 3 ] } ]
"""


def normalized(text: str) -> object:
    return normalize_config(parse_config_text(text, "test"), "model")


def test_without_model_warmup_zeros_run_three_times_at_batch_sizes_one_two_and_eight(tmp_path: Path) -> None:
    # TorchScript's profiling executor specialises a shape after two unoptimised runs: one sample at
    # batch 1 left the slow runs of batch 1 and of every new batch size to real traffic.
    config = normalized(CONFIG)
    samples = warmup_samples(config, signature_of(config), tmp_path)  # type: ignore[arg-type]
    assert [batch for _, batch in samples] == [1, 1, 1, 2, 2, 2, 8, 8, 8]
    for inputs, batch_size in samples:
        np.testing.assert_array_equal(inputs["x"], np.zeros((batch_size, 3), np.float32))
        assert inputs["t"].shape == (batch_size, 1) and (inputs["t"] == b"").all()


def test_without_model_warmup_an_unbatched_model_runs_its_one_sample_three_times(tmp_path: Path) -> None:
    config = normalized(CONFIG.replace("max_batch_size: 8", "max_batch_size: 0"))
    samples = warmup_samples(config, signature_of(config), tmp_path)  # type: ignore[arg-type]
    assert [batch for _, batch in samples] == [1, 1, 1]
    assert samples[0][0]["x"].shape == (3,)


def test_model_warmup_zero_random_and_file_samples(tmp_path: Path) -> None:
    (tmp_path / "warmup").mkdir()
    (tmp_path / "warmup" / "x.bin").write_bytes(np.array([1, 2, 3], np.float32).tobytes())
    text = (
        CONFIG
        + """
model_warmup [
  { name: "zeros" batch_size: 2 count: 2 inputs [
      { key: "x" value: { data_type: TYPE_FP32 dims: [ 3 ] zero_data: true } },
      { key: "t" value: { data_type: TYPE_STRING dims: [ 2 ] zero_data: true } } ] },
  { name: "file" batch_size: 4 inputs [
      { key: "x" value: { data_type: TYPE_FP32 dims: [ 3 ] input_data_file: "x.bin" } },
      { key: "t" value: { data_type: TYPE_STRING dims: [ 1 ] random_data: true } } ] }
]
"""
    )
    config = normalized(text)
    samples = warmup_samples(config, signature_of(config), tmp_path)  # type: ignore[arg-type]
    assert [batch for _, batch in samples] == [2, 2, 4]
    np.testing.assert_array_equal(samples[0][0]["x"], np.zeros((2, 3), np.float32))
    assert samples[0][0]["t"].shape == (2, 2)
    np.testing.assert_array_equal(samples[2][0]["x"], np.tile(np.array([1, 2, 3], np.float32), (4, 1)))
    assert samples[2][0]["t"].shape == (4, 1)


def add_model(repository: Path, name: str, module: torch.nn.Module) -> Path:
    """Version 1 of a scripted module, batched up to 4 rows of x [2] -> y [2]; its model directory."""
    model_dir = repository / name
    (model_dir / "1").mkdir(parents=True)
    torch.jit.save(torch.jit.script(module), str(model_dir / "1" / "model.pt"))
    (model_dir / "config.pbtxt").write_text(
        'max_batch_size: 4 input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] } ] '
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 2 ] } ]'
    )
    return model_dir


class FailsOnZeros(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x == 0).all()):
            raise RuntimeError("this model cannot take all-zero input")
        return x


async def test_a_version_whose_warm_up_fails_is_unavailable_with_the_reason(tmp_path: Path) -> None:
    model_dir = add_model(tmp_path, "picky", FailsOnZeros())
    with ThreadPoolExecutor(1) as executor:
        repository = ModelRepository(tmp_path, executor, Metrics.create(CollectorRegistry()))
        with pytest.raises(FailedPreconditionError) as caught:
            await repository.load("picky")
        assert "warm-up failed" in caught.value.message and "all-zero input" in caught.value.message
        [entry] = repository.index(ready_only=False)
        assert (entry.version, entry.state) == ("1", "UNAVAILABLE")
        assert "warm-up failed" in entry.reason
        with pytest.raises(UnavailableError):
            repository.resolve("picky", "")

        # With a warm-up sample the model accepts, the same version loads.
        (model_dir / "config.pbtxt").write_text(
            (model_dir / "config.pbtxt").read_text()
            + ' model_warmup [ { name: "ones" batch_size: 1 inputs { key: "x" value: '
            "{ data_type: TYPE_FP32 dims: [ 2 ] random_data: true } } } ]"
        )
        await repository.load("picky")
        assert repository.resolve("picky", "1").version == 1
        assert repository.index(ready_only=True)[0].state == "READY"


class OneRowWhateverTheBatch(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:1]


async def test_the_default_warm_up_refuses_a_model_that_answers_one_row_for_a_batch(tmp_path: Path) -> None:
    # right for a batch of one, wrong for any other: the default warm-up's batch of 2 finds it at load
    add_model(tmp_path, "first_row", OneRowWhateverTheBatch())
    with ThreadPoolExecutor(1) as executor:
        repository = ModelRepository(tmp_path, executor, Metrics.create(CollectorRegistry()))
        with pytest.raises(FailedPreconditionError) as caught:
            await repository.load("first_row")
        assert "warm-up failed" in caught.value.message and "'y'" in caught.value.message, caught.value.message
