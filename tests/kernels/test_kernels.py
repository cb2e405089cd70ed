"""weir_kernels: every implementation against its torch reference.

* CPU: the CPU fallbacks (what runs without a GPU) against the references, plus quantisation bounds,
  the nn.Module wrapper and argument validation;
* Triton interpreter: the Triton kernels run on CPU tensors with ``TRITON_INTERPRET=1``. The
  interpreter is chosen when a kernel is first built, so these cases run in one subprocess that has
  the variable set from the start (this process may build the compiled kernels for the GPU tests);
  skipped when triton is not installed;
* GPU (``-m gpu``): the compiled Triton kernels on CUDA; skipped without a CUDA device.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

from weir_kernels import (
    Int8WeightOnlyLinear,
    dequantize_weight,
    linear,
    linear_cpu,
    linear_reference,
    linear_triton,
    preprocess,
    preprocess_cpu,
    preprocess_reference,
    preprocess_triton,
    quantize_weight,
    triton_available,
)

ROOT = Path(__file__).resolve().parents[2]

LinearFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
PreprocessFn = Callable[..., torch.Tensor]

# Largest |impl - reference| allowed, relative to max |reference|: a few roundings of each dtype
# (the implementations round differently from the reference, e.g. scale applied after the GEMM).
REL_TOL = {"float32": 1e-5, "float16": 5e-3, "bfloat16": 3e-2}
# Preprocess outputs are at most ~|(1 - mean) / std|; one rounding step of each dtype there.
PRE_ATOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 3.2e-2}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class LinearCase:
    lead: tuple[int, ...]  # leading dims of x: () is a 1-D x
    n: int
    k: int
    dtype: str
    bias: bool

    @property
    def id(self) -> str:
        lead = "x".join(map(str, self.lead)) or "vec"
        return f"{lead}-{self.n}x{self.k}-{self.dtype}-{'bias' if self.bias else 'nobias'}"


def _linear_cases(shapes: list[tuple[tuple[int, ...], int, int]], dtypes: tuple[str, ...]) -> list[LinearCase]:
    return [LinearCase(lead, n, k, dtype, bias) for lead, n, k in shapes for dtype in dtypes for bias in (False, True)]


CPU_LINEAR_SHAPES = [
    ((5,), 96, 200),  # no dimension a multiple of any block size; bf16 skips the int8pack kernel (K % 16)
    ((2, 3), 33, 17),  # 3-D activations
    ((), 40, 64),  # 1-D activations
    ((1,), 64, 256),  # bf16: torch's int8pack kernel (one row)
    ((4, 4), 50, 128),  # bf16: int8pack kernel at its 16-row limit
    ((17,), 64, 256),  # bf16: just past it, blocked dequantise+GEMM
    ((3,), 300, 1024),  # several dequantisation blocks, the last one partial
    ((1,), 7, 1),
]
CPU_LINEAR_CASES = _linear_cases(CPU_LINEAR_SHAPES, ("float32", "bfloat16", "float16"))
INTERP_LINEAR_CASES = _linear_cases(
    [((5,), 96, 200), ((2, 3), 33, 17), ((70,), 40, 64)], ("float32", "bfloat16", "float16")
)
GPU_LINEAR_CASES = _linear_cases(
    [((5,), 96, 200), ((2, 3), 33, 17), ((1,), 4096, 4096), ((40,), 1000, 1000), ((3, 100), 768, 512)],
    ("float32", "bfloat16", "float16"),
)


def check_linear(fn: LinearFn, case: LinearCase, device: str = "cpu") -> str | None:
    """Run ``fn`` on the case; None when it matches the reference, else a description of the mismatch."""
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    dtype = getattr(torch, case.dtype)
    qweight, scale = quantize_weight(torch.randn(case.n, case.k, generator=gen))
    x = torch.randn(*case.lead, case.k, generator=gen).to(dtype)
    bias = torch.randn(case.n, generator=gen) if case.bias else None
    qweight, scale, x = qweight.to(device), scale.to(device), x.to(device)
    bias = None if bias is None else bias.to(device)
    want = linear_reference(x, qweight, scale, bias)
    got = fn(x, qweight, scale, bias)
    if got.shape != want.shape or got.dtype != want.dtype:
        return f"got {tuple(got.shape)} {got.dtype}, want {tuple(want.shape)} {want.dtype}"
    err = (got.double() - want.double()).abs().max().item()
    bound = REL_TOL[case.dtype] * max(want.double().abs().max().item(), 1e-6)
    return None if err <= bound else f"max |got - want| = {err:.3g} > {bound:.3g}"


@dataclass(frozen=True)
class PreprocessCase:
    shape: tuple[int, ...]  # HWC or NHWC
    dtype: str

    @property
    def id(self) -> str:
        return f"{'x'.join(map(str, self.shape))}-{self.dtype}"


PREPROCESS_CASES = [
    PreprocessCase(shape, dtype)
    for shape in [(5, 7, 3), (2, 5, 7, 3), (1, 40, 50, 4), (3, 9, 11, 1)]
    for dtype in ("float32", "float16", "bfloat16")
]


def check_preprocess(fn: PreprocessFn, case: PreprocessCase, device: str = "cpu") -> str | None:
    gen = torch.Generator().manual_seed(zlib.crc32(case.id.encode()))
    images = torch.randint(0, 256, case.shape, dtype=torch.uint8, generator=gen).to(device)
    channels = case.shape[-1]
    mean = [0.1 + 0.2 * c for c in range(channels)]
    std = [0.2 + 0.05 * c for c in range(channels)]
    dtype = getattr(torch, case.dtype)
    want = preprocess_reference(images, mean, std, dtype)
    got = fn(images, mean, std, dtype)
    if got.shape != want.shape or got.dtype != want.dtype or not got.is_contiguous():
        return f"got {tuple(got.shape)} {got.dtype} contiguous={got.is_contiguous()}, want {tuple(want.shape)} {dtype}"
    err = (got.double() - want.double()).abs().max().item()
    return None if err <= PRE_ATOL[case.dtype] else f"max |got - want| = {err:.3g} > {PRE_ATOL[case.dtype]}"


# ------------------------------------------------------------------------------------------ quantize


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_quantize_error_is_at_most_half_a_step(dtype: torch.dtype) -> None:
    weight = (torch.randn(37, 53) * torch.logspace(-3, 2, 37)[:, None]).to(dtype)
    qweight, scale = quantize_weight(weight)
    assert qweight.dtype == torch.int8 and qweight.shape == (37, 53)
    assert scale.dtype == torch.float32 and scale.shape == (37,)
    assert int(qweight.abs().max()) <= 127
    w = weight.float()
    torch.testing.assert_close(scale, w.abs().amax(dim=1) / 127)
    error = (w - dequantize_weight(qweight, scale)).abs()
    assert bool((error <= scale[:, None] / 2 * (1 + 1e-5)).all())
    # Each row's largest element maps to +-127: the whole int8 range is used.
    assert bool((qweight.abs().amax(dim=1) == 127).all())


def test_quantize_zero_rows_get_a_positive_scale() -> None:
    weight = torch.zeros(3, 8)
    weight[1] = torch.linspace(-1, 1, 8)
    qweight, scale = quantize_weight(weight)
    assert bool((scale > 0).all())
    assert int(qweight[0].abs().max()) == 0 and int(qweight[2].abs().max()) == 0
    torch.testing.assert_close(dequantize_weight(qweight, scale), weight, atol=float(scale[1]) / 2, rtol=0)


@pytest.mark.parametrize(
    ("weight", "match"),
    [
        (torch.randn(4), "weight: expected a 2-D"),
        (torch.ones(2, 2, dtype=torch.int32), "weight: expected a floating-point tensor"),
        (torch.tensor([[1.0, float("nan")]]), "weight: expected finite values"),
    ],
)
def test_quantize_rejects_bad_weights(weight: torch.Tensor, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        quantize_weight(weight)


# ------------------------------------------------------------------------------------- linear (CPU)


@pytest.mark.parametrize("case", CPU_LINEAR_CASES, ids=lambda c: c.id)
def test_linear_cpu_matches_reference(case: LinearCase) -> None:
    assert check_linear(linear_cpu, case) is None


@pytest.mark.parametrize("case", CPU_LINEAR_CASES[:6], ids=lambda c: c.id)
def test_linear_dispatch_on_cpu_is_the_cpu_path(case: LinearCase) -> None:
    assert check_linear(linear, case) is None


def test_linear_cpu_bf16_handles_misaligned_operands() -> None:
    """torch's int8pack kernel uses aligned vector loads: a view at an odd offset must not reach it (it
    would crash the process); x is realigned, a misaligned weight takes the blocked path."""
    qweight, scale = quantize_weight(torch.randn(48, 64))
    x = torch.randn(3 * 64 + 1).to(torch.bfloat16)[1:].view(3, 64)
    assert x.data_ptr() % 32 != 0
    want = linear_reference(x, qweight, scale)
    torch.testing.assert_close(linear_cpu(x, qweight, scale), want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))
    storage = torch.empty(48 * 64 + 1, dtype=torch.int8)
    odd_qweight = storage[1:].view(48, 64)
    odd_qweight.copy_(qweight)
    torch.testing.assert_close(linear_cpu(x, odd_qweight, scale), want, rtol=3e-2, atol=3e-2 * float(want.abs().max()))


def test_linear_cpu_accepts_non_contiguous_activations() -> None:
    qweight, scale = quantize_weight(torch.randn(20, 32))
    x = torch.randn(32, 6).t()  # [6, 32], column-major
    torch.testing.assert_close(linear_cpu(x, qweight, scale), linear_reference(x, qweight, scale))


def test_linear_empty_batch() -> None:
    qweight, scale = quantize_weight(torch.randn(20, 32))
    assert linear_cpu(torch.randn(0, 32), qweight, scale).shape == (0, 20)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"qweight": torch.zeros(4, 8)}, "qweight: expected a 2-D int8"),
        ({"x": torch.randn(2, 7)}, r"x: expected last dimension 8 \(qweight's in_features\), got 7"),
        ({"x": torch.ones(2, 8, dtype=torch.int64)}, "x: expected a floating-point tensor"),
        ({"scale": torch.ones(3)}, "scale: expected a 1-D floating-point tensor of 4 values"),
        ({"bias": torch.ones(5)}, "bias: expected None or a 1-D floating-point tensor of 4 values"),
    ],
)
def test_linear_rejects_bad_arguments(kwargs: dict[str, torch.Tensor], match: str) -> None:
    args: dict[str, torch.Tensor | None] = {
        "x": torch.randn(2, 8),
        "qweight": torch.zeros(4, 8, dtype=torch.int8),
        "scale": torch.ones(4),
        "bias": None,
    }
    args.update(kwargs)
    for fn in (linear_reference, linear_cpu, linear):
        with pytest.raises(ValueError, match=match):
            fn(**args)  # type: ignore[arg-type]


def test_linear_triton_without_triton_says_so() -> None:
    if triton_available():
        pytest.skip("triton is installed")
    qweight, scale = quantize_weight(torch.randn(4, 8))
    with pytest.raises(RuntimeError, match="needs the 'triton' package"):
        linear_triton(torch.randn(2, 8), qweight, scale)


# --------------------------------------------------------------------------------- nn.Module wrapper


@pytest.mark.parametrize("bias", [True, False])
def test_int8_module_is_close_to_the_float_layer(bias: bool) -> None:
    torch.manual_seed(0)
    float_layer = nn.Linear(256, 96, bias=bias)
    layer = Int8WeightOnlyLinear.from_float(float_layer)
    x = torch.randn(4, 5, 256)
    with torch.no_grad():
        want = float_layer(x)
        got = layer(x)
    assert got.shape == want.shape
    # Only the weight quantisation separates them: each weight is off by at most half a step (1/254
    # of its row's absmax), which over a 256-term dot product stays around 1% of the output scale.
    assert float((got - want).abs().max()) <= 0.02 * float(want.abs().max())
    torch.testing.assert_close(got, linear_reference(x, layer.qweight, layer.scale, layer.bias))
    assert "in_features=256, out_features=96" in repr(layer)


def test_int8_module_state_dict_round_trip_and_bf16_inputs() -> None:
    layer = Int8WeightOnlyLinear.from_float(nn.Linear(64, 32))
    assert set(layer.state_dict()) == {"qweight", "scale", "bias"}
    assert list(layer.parameters()) == []
    copy = Int8WeightOnlyLinear(64, 32)
    copy.load_state_dict(layer.state_dict())
    x = torch.randn(3, 64).to(torch.bfloat16)
    got = copy(x)
    assert got.dtype == torch.bfloat16
    want = linear_reference(x, layer.qweight, layer.scale, layer.bias)
    assert float((got.float() - want.float()).abs().max()) <= 3e-2 * float(want.float().abs().max())


def test_int8_module_from_float_rejects_other_modules() -> None:
    with pytest.raises(TypeError, match=r"linear: expected an nn\.Linear, got Conv1d"):
        Int8WeightOnlyLinear.from_float(nn.Conv1d(2, 2, 1))  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------- preprocess (CPU)


@pytest.mark.parametrize("case", PREPROCESS_CASES, ids=lambda c: c.id)
def test_preprocess_cpu_matches_reference(case: PreprocessCase) -> None:
    assert check_preprocess(preprocess_cpu, case) is None
    assert check_preprocess(preprocess, case) is None


def test_preprocess_reference_is_the_formula() -> None:
    images = torch.tensor([[[0, 255, 51]]], dtype=torch.uint8)  # one HWC pixel
    got = preprocess_reference(images, IMAGENET_MEAN, IMAGENET_STD)
    want = torch.tensor([(0 - 0.485) / 0.229, (1 - 0.456) / 0.224, (0.2 - 0.406) / 0.225]).view(3, 1, 1)
    torch.testing.assert_close(got, want)


def test_preprocess_cpu_accepts_views_and_tensor_stats() -> None:
    images = torch.randint(0, 256, (2, 20, 30, 3), dtype=torch.uint8)
    crop = images[:, 3:15, 5:25]  # not contiguous
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(
        preprocess_cpu(crop, mean, std), preprocess_reference(crop, IMAGENET_MEAN, IMAGENET_STD), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    ("images", "mean", "std", "dtype", "match"),
    [
        (torch.zeros(4, 4, 3), IMAGENET_MEAN, IMAGENET_STD, torch.float32, "images: expected dtype torch.uint8, got"),
        (torch.zeros(4, 3, dtype=torch.uint8), IMAGENET_MEAN, IMAGENET_STD, torch.float32, "images: expected a 3-D"),
        (torch.zeros(1, 1, 4, 4, 3, dtype=torch.uint8), IMAGENET_MEAN, IMAGENET_STD, torch.float32, "got 5-D"),
        (torch.zeros(4, 4, 4, dtype=torch.uint8), IMAGENET_MEAN, (1.0,) * 4, torch.float32, "mean: expected 4 values"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), IMAGENET_MEAN, (1.0, 1.0), torch.float32, "std: expected 3 values"),
        (
            torch.zeros(4, 4, 3, dtype=torch.uint8),
            IMAGENET_MEAN,
            (1.0, 0.0, 1.0),
            torch.float32,
            "std: expected finite",
        ),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), IMAGENET_MEAN, IMAGENET_STD, torch.int32, "dtype: expected"),
    ],
)
def test_preprocess_rejects_bad_arguments(
    images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype, match: str
) -> None:
    for fn in (preprocess_reference, preprocess_cpu, preprocess):
        with pytest.raises(ValueError, match=match):
            fn(images, mean, std, dtype)


def test_preprocess_rejects_non_tensors() -> None:
    with pytest.raises(TypeError, match=r"images: expected a torch\.Tensor, got list"):
        preprocess([[[0, 0, 0]]], IMAGENET_MEAN, IMAGENET_STD)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------- Triton interpreter


def run_interpreter_cases() -> None:
    """Entry point of the interpreter subprocess: prints ``{case id: None or mismatch}`` as JSON."""
    results: dict[str, str | None] = {}
    for case in INTERP_LINEAR_CASES:
        results[f"linear-{case.id}"] = check_linear(linear_triton, case)
    for pcase in PREPROCESS_CASES:
        results[f"preprocess-{pcase.id}"] = check_preprocess(preprocess_triton, pcase)
    print(json.dumps(results))


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, str | None]:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    code = "from tests.kernels.test_kernels import run_interpreter_cases; run_interpreter_cases()"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    assert proc.returncode == 0, f"interpreter run failed:\n{proc.stderr[-4000:]}"
    results: dict[str, str | None] = json.loads(proc.stdout.strip().splitlines()[-1])
    return results


@pytest.mark.parametrize("case", INTERP_LINEAR_CASES, ids=lambda c: c.id)
def test_linear_triton_interpreter_matches_reference(
    interpreter_results: dict[str, str | None], case: LinearCase
) -> None:
    assert interpreter_results[f"linear-{case.id}"] is None


@pytest.mark.parametrize("case", PREPROCESS_CASES, ids=lambda c: c.id)
def test_preprocess_triton_interpreter_matches_reference(
    interpreter_results: dict[str, str | None], case: PreprocessCase
) -> None:
    assert interpreter_results[f"preprocess-{case.id}"] is None


# ---------------------------------------------------------------------------------------------- GPU

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", GPU_LINEAR_CASES, ids=lambda c: c.id)
def test_linear_triton_cuda_matches_reference(case: LinearCase) -> None:
    pytest.importorskip("triton")
    assert check_linear(linear_triton, case, device="cuda") is None
    assert check_linear(linear, case, device="cuda") is None


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("case", PREPROCESS_CASES, ids=lambda c: c.id)
def test_preprocess_triton_cuda_matches_reference(case: PreprocessCase) -> None:
    pytest.importorskip("triton")
    assert check_preprocess(preprocess_triton, case, device="cuda") is None
    assert check_preprocess(preprocess, case, device="cuda") is None


@pytest.mark.gpu
@needs_cuda
def test_int8_module_on_cuda() -> None:
    pytest.importorskip("triton")
    float_layer = nn.Linear(512, 256).cuda().half()
    layer = Int8WeightOnlyLinear.from_float(float_layer)
    x = torch.randn(8, 512, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        want = float_layer(x).float()
        got = layer(x).float()
    assert float((got - want).abs().max()) <= 0.03 * float(want.abs().max())
