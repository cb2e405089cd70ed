"""Fused image preprocessing: uint8 HWC/NHWC pixels -> normalised CHW/NCHW float, in one pass.

Decoded images arrive as uint8 ``[H, W, C]`` (or batched ``[N, H, W, C]``); vision models want float
``[N, C, H, W]`` with ``(x / 255 - mean) / std`` per channel. Done as separate torch ops that is a
convert, a divide, a subtract, a divide and a layout change - five passes over a tensor four times the
input's size. Here it is one affine map per channel, ``x * scale[c] + shift[c]`` with
``scale = 1 / (255 * std)`` and ``shift = -mean / std`` precomputed in float64, fused with the
HWC -> CHW transpose:

* :func:`preprocess_reference` - the literal formula in torch ops, the ground truth;
* :func:`preprocess_cpu` - two passes on CPU (convert+transpose+scale, then shift) into a preallocated output;
* :func:`preprocess_triton` - a Triton kernel reading each pixel once and writing each output once;
* :func:`preprocess` - the dispatcher: Triton for CUDA tensors when Triton is importable, else the CPU path.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Sequence
from typing import Any

import torch

from weir_kernels.int8_linear import _triton_importable

__all__ = ["preprocess", "preprocess_cpu", "preprocess_reference", "preprocess_triton"]

Stats = Sequence[float] | torch.Tensor

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# CUDA caps grid dimension 1 at 65535; the batch index uses it, so larger batches launch in chunks.
_MAX_GRID_Y = 65535


def _as_floats(name: str, values: Stats) -> tuple[float, ...]:
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name}: expected a 1-D tensor or a sequence of floats, got a {values.dim()}-D tensor")
        return tuple(float(v) for v in values.tolist())
    try:
        return tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{name}: expected a sequence of floats, got {values!r}") from exc


def _validate(
    images: torch.Tensor, mean: Stats, std: Stats, dtype: torch.dtype
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Check the arguments; returns ``mean`` and ``std`` as tuples of floats. Raises ValueError/TypeError."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images: expected a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise ValueError(f"images: expected dtype torch.uint8, got {images.dtype}")
    if images.dim() not in (3, 4):
        raise ValueError(
            f"images: expected a 3-D [H, W, C] or 4-D [N, H, W, C] tensor, "
            f"got {images.dim()}-D with shape {tuple(images.shape)}"
        )
    if dtype not in _OUT_DTYPES:
        raise ValueError(f"dtype: expected torch.float32, torch.float16 or torch.bfloat16, got {dtype}")
    channels = images.shape[-1]
    mean_f = _as_floats("mean", mean)
    std_f = _as_floats("std", std)
    if len(mean_f) != channels:
        raise ValueError(f"mean: expected {channels} values (one per channel of images), got {len(mean_f)}")
    if len(std_f) != channels:
        raise ValueError(f"std: expected {channels} values (one per channel of images), got {len(std_f)}")
    if not all(math.isfinite(v) for v in mean_f):
        raise ValueError(f"mean: expected finite values, got {mean_f}")
    if not all(math.isfinite(v) and v > 0 for v in std_f):
        raise ValueError(f"std: expected finite positive values, got {std_f}")
    return mean_f, std_f


@functools.lru_cache(maxsize=64)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``(scale, shift)`` as fp32 tensors on ``device``, cached: a server normalises every
    request with the same statistics, and building them per call costs a host-to-device copy on GPU."""
    scale = torch.tensor([1.0 / (255.0 * s) for s in std], dtype=torch.float64)
    shift = torch.tensor([-m / s for m, s in zip(mean, std, strict=True)], dtype=torch.float64)
    return scale.to(device=device, dtype=torch.float32), shift.to(device=device, dtype=torch.float32)


def preprocess_reference(
    images: torch.Tensor, mean: Stats, std: Stats, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The definition: ``((x / 255 - mean) / std)`` in fp32, channels moved first, cast to ``dtype``."""
    mean_f, std_f = _validate(images, mean, std, dtype)
    x = images.to(torch.float32) / 255.0
    x = (x - torch.tensor(mean_f, device=images.device)) / torch.tensor(std_f, device=images.device)
    return x.movedim(-1, -3).contiguous().to(dtype)


def preprocess_cpu(images: torch.Tensor, mean: Stats, std: Stats, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The CPU path (correct on any device): ``x * scale + shift`` into a preallocated NCHW output.

    The first pass reads the uint8 pixels through a channels-first *view* and writes the scaled
    values straight into the contiguous output (conversion, transpose and multiply in one
    TensorIterator loop, computed in fp32 and rounded once); the second adds the shift in place.
    """
    mean_f, std_f = _validate(images, mean, std, dtype)
    batched = images.dim() == 4
    x = images if batched else images.unsqueeze(0)
    n, h, w, c = x.shape
    scale, shift = _affine(mean_f, std_f, images.device)
    out = torch.empty((n, c, h, w), dtype=dtype, device=images.device)
    torch.mul(x.permute(0, 3, 1, 2), scale.view(1, c, 1, 1), out=out)
    out.add_(shift.view(1, c, 1, 1))
    return out if batched else out[0]


# --------------------------------------------------------------------------------------------- Triton


# Bound by _triton_kernel() on first use (Triton is an optional dependency).
triton: Any = None
tl: Any = None


@functools.cache
def _triton_kernel() -> Any:
    """Build (once) the Triton kernel; raises ImportError when Triton is not installed.

    Imported lazily so ``weir_kernels`` works without Triton and ``TRITON_INTERPRET`` is read at first
    use; ``triton``/``tl`` become module globals because Triton resolves a kernel's names through its
    ``__globals__`` (closure capture only exists in recent Triton releases).
    """
    global triton, tl
    triton = importlib.import_module("triton")
    tl = importlib.import_module("triton.language")

    @triton.jit
    def _preprocess_kernel(  # type: ignore[no-untyped-def]
        in_ptr,
        out_ptr,
        scale_ptr,
        shift_ptr,
        HW,
        C,
        BLOCK: tl.constexpr,
        C_PAD: tl.constexpr,
    ):
        # Program (i, n) handles BLOCK pixels of image n, all channels: it loads a [BLOCK, C_PAD] tile
        # (BLOCK*C contiguous bytes of the HWC input) and stores it transposed, each channel's BLOCK
        # values being contiguous in the CHW output.
        n = tl.program_id(1).to(tl.int64)
        pix = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        ch = tl.arange(0, C_PAD)
        mask_c = ch < C
        mask = (pix < HW)[:, None] & mask_c[None, :]
        x = tl.load(in_ptr + n * HW * C + pix[:, None] * C + ch[None, :], mask=mask, other=0)
        scale = tl.load(scale_ptr + ch, mask=mask_c, other=0.0)
        shift = tl.load(shift_ptr + ch, mask=mask_c, other=0.0)
        y = x.to(tl.float32) * scale[None, :] + shift[None, :]
        out_ptrs = out_ptr + n * C * HW + ch[None, :] * HW + pix[:, None]
        tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)

    return _preprocess_kernel


def preprocess_triton(
    images: torch.Tensor, mean: Stats, std: Stats, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """The Triton kernel: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``.

    Raises RuntimeError when Triton is not installed.
    """
    mean_f, std_f = _validate(images, mean, std, dtype)
    try:
        kernel = _triton_kernel()
    except ImportError as exc:
        raise RuntimeError("preprocess_triton needs the 'triton' package, which is not importable") from exc
    batched = images.dim() == 4
    x = (images if batched else images.unsqueeze(0)).contiguous()
    n, h, w, c = x.shape
    scale, shift = _affine(mean_f, std_f, images.device)
    out = torch.empty((n, c, h, w), dtype=dtype, device=images.device)
    hw = h * w
    if out.numel() > 0:
        block = 1024 if hw >= 1024 else max(16, triton.next_power_of_2(hw))
        for start in range(0, n, _MAX_GRID_Y):
            stop = min(start + _MAX_GRID_Y, n)
            grid = (triton.cdiv(hw, block), stop - start)
            kernel[grid](
                x[start:stop], out[start:stop], scale, shift, hw, c, BLOCK=block, C_PAD=triton.next_power_of_2(c)
            )
    return out if batched else out[0]


def preprocess(images: torch.Tensor, mean: Stats, std: Stats, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dispatch: the Triton kernel for CUDA tensors when Triton is importable, else :func:`preprocess_cpu`."""
    if isinstance(images, torch.Tensor) and images.is_cuda and _triton_importable():
        return preprocess_triton(images, mean, std, dtype)
    return preprocess_cpu(images, mean, std, dtype)
