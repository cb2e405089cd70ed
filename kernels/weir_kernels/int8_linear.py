"""Int8 weight-only linear layers: int8 weights, one fp32 scale per output channel, float activations.

Weight-only quantisation cuts a linear layer's weight memory (and the bytes read per forward) by 4x
against fp32 and 2x against fp16, which is what bounds small-batch (decode-like) inference; the
activations and the accumulation stay in floating point, so accuracy is close to the float layer.

Four implementations of the same function ``x @ (qweight * scale[:, None]).T + bias``:

* :func:`linear_reference` - the plain torch definition, the ground truth the others are tested against;
* :func:`linear_cpu` - the fastest path torch offers on CPU (also correct on any device);
* :func:`linear_triton` - a Triton GPU kernel that dequantises inside its K loop, so the float weight
  never exists in memory: int8 tiles are loaded, converted and fed to the tensor cores, and the
  per-output-channel scale is applied once to the accumulator at the end;
* :func:`linear` - the dispatcher: Triton for CUDA tensors when Triton is importable, else the CPU path.
"""

from __future__ import annotations

import functools
import importlib
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "Int8WeightOnlyLinear",
    "dequantize_weight",
    "linear",
    "linear_cpu",
    "linear_reference",
    "linear_triton",
    "quantize_weight",
]

_QMAX = 127
# On CPU the dequantised weight is materialised in row blocks of about this many bytes: a block stays
# in the L2 cache between its conversion and its GEMM, and a call never holds a full float copy of the
# weight (which would undo the memory saving for large layers).
_CPU_BLOCK_BYTES = 1 << 20
# torch's int8 weight-only CPU kernel (aten::_weight_int8pack_mm) is a small-M GEMV-style kernel: its
# bf16 path beats the blocked dequantise+GEMM path up to a few rows and loses from ~32 rows on.
_INT8PACK_MAX_ROWS = 16
_HAS_INT8PACK_MM = hasattr(torch.ops.aten, "_weight_int8pack_mm")


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise a float ``[out, in]`` weight to symmetric per-output-channel int8.

    Returns ``(qweight, scale)``: ``qweight`` int8 ``[out, in]`` (values in -127..127, so the range is
    symmetric and negation never overflows) and ``scale`` fp32 ``[out]`` with ``scale = absmax / 127``.
    The scale is never 0 (an all-zero row gets the smallest normal fp32 and quantises to zeros), so
    dividing by it is always safe. Every element satisfies ``|w - q * scale| <= scale / 2``.
    """
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        got = f"{weight.dim()}-D" if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected a 2-D [out_features, in_features] tensor, got {got}")
    if not weight.is_floating_point():
        raise ValueError(f"weight: expected a floating-point tensor, got {weight.dtype}")
    w = weight.detach().to(torch.float32)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("weight: expected finite values, got inf or nan")
    absmax = w.abs().amax(dim=1) if w.shape[1] > 0 else w.new_zeros(w.shape[0])
    scale = (absmax / _QMAX).clamp_min(torch.finfo(torch.float32).tiny)
    qweight = torch.round(w / scale[:, None]).clamp_(-_QMAX, _QMAX).to(torch.int8)
    return qweight.contiguous(), scale.contiguous()


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``qweight * scale[:, None]`` computed in fp32, then cast to ``dtype`` (one rounding)."""
    return (qweight.to(torch.float32) * scale.to(torch.float32)[:, None]).to(dtype)


def _check_args(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Shape, dtype and device checks shared by every implementation (metadata only: no device sync)."""
    if qweight.dtype != torch.int8 or qweight.dim() != 2:
        raise ValueError(
            f"qweight: expected a 2-D int8 [out_features, in_features] tensor, got {qweight.dim()}-D {qweight.dtype}"
        )
    n, k = qweight.shape
    if scale.dim() != 1 or scale.shape[0] != n or not scale.is_floating_point():
        raise ValueError(
            f"scale: expected a 1-D floating-point tensor of {n} values (one per output channel), "
            f"got shape {tuple(scale.shape)} {scale.dtype}"
        )
    if not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"x: expected a floating-point tensor of at least 1 dimension, got {x.dim()}-D {x.dtype}")
    if x.shape[-1] != k:
        raise ValueError(f"x: expected last dimension {k} (qweight's in_features), got {x.shape[-1]}")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n or not bias.is_floating_point()):
        raise ValueError(
            f"bias: expected None or a 1-D floating-point tensor of {n} values, "
            f"got shape {tuple(bias.shape)} {bias.dtype}"
        )
    devices = {t.device for t in (x, qweight, scale, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"x, qweight, scale, bias: expected one device, got {sorted(str(d) for d in devices)}")


def linear_reference(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The definition: dequantise the weight to ``x``'s dtype, then ``F.linear``. Slow, exact, obvious."""
    _check_args(x, qweight, scale, bias)
    weight = dequantize_weight(qweight, scale, x.dtype)
    return F.linear(x, weight, None if bias is None else bias.to(x.dtype))


def _aligned(t: torch.Tensor, alignment: int) -> bool:
    return t.data_ptr() % alignment == 0


def _int8pack_mm_usable(x2: torch.Tensor, qweight: torch.Tensor) -> bool:
    """Whether ``aten::_weight_int8pack_mm`` is both fast and safe for this bf16 call.

    Its x86 kernels (AVX2/AVX512, see aten/src/ATen/native/cpu/int8mm_kernel.cpp) step K by 8/16
    with no tail loop and use *aligned* vector loads of both operands: with K % 16 != 0 or a misaligned
    base pointer they read garbage or crash the process (checked on torch 2.13: K=200 segfaults, K=33
    returns nonsense). Only bf16 gets a vectorised kernel on x86 (fp32/fp16 run a scalar loop there,
    ~20x slower than dequantise+GEMM), so the op is used only for bf16 activations, few rows, K a
    multiple of 16 and operands aligned for 32-byte loads.
    """
    m, k = x2.shape
    return (
        _HAS_INT8PACK_MM
        and x2.device.type == "cpu"
        and 0 < m <= _INT8PACK_MAX_ROWS
        and k > 0
        and k % 16 == 0
        and qweight.shape[0] > 0
        and qweight.is_contiguous()
        and _aligned(qweight, 64)
    )


def _dequant_mm_blocked(
    x2: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """``x2 @ dequant(qweight).T + bias`` with the weight converted block by block into a reused buffer.

    The scale is applied to the ``[M, N]`` output rather than to the ``[N, K]`` weight - mathematically
    the same (``x @ (q * s).T == (x @ q.T) * s``) and one pass less over the big operand; it needs the
    compute dtype to have fp32's range, which the caller guarantees (fp16 is computed in fp32).
    """
    m, k = x2.shape
    n = qweight.shape[0]
    dtype = x2.dtype
    out = torch.empty((m, n), dtype=dtype, device=x2.device)
    # Off CPU (CUDA without Triton) a block loop only adds launches: convert the whole weight at once.
    rows = n
    if x2.device.type == "cpu":
        rows = min(n, max(16, _CPU_BLOCK_BYTES // max(1, k * x2.element_size())))
    if n > 0:
        buffer = torch.empty((rows, k), dtype=dtype, device=x2.device)
        for start in range(0, n, rows):
            stop = min(start + rows, n)
            block = buffer[: stop - start]
            block.copy_(qweight[start:stop])
            if stop - start == n:
                torch.mm(x2, block.t(), out=out)
            else:
                torch.mm(x2, block.t(), out=out[:, start:stop])
    out.mul_(scale)  # in place in the output dtype; computed in fp32 when scale is fp32
    if bias is not None:
        out.add_(bias)
    return out


def linear_cpu(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The CPU path: ``x @ dequant(qweight).T + bias`` for ``x`` of shape ``[..., in_features]``.

    * bf16, up to 16 rows, K % 16 == 0: torch's fused int8 kernel ``aten::_weight_int8pack_mm``, which
      reads the int8 weight directly (1x1024 @ 1024x1024, one thread: ~70 us against ~150 us
      for ``F.linear`` over the fp32 weight);
    * otherwise: blocked dequantise+GEMM (:func:`_dequant_mm_blocked`) in the activation dtype, or in
      fp32 for fp16 activations (CPU fp16 GEMMs are slow, and fp16 cannot hold the unscaled products).

    Works on any device; the dispatcher sends CUDA tensors to Triton when it can.
    """
    _check_args(x, qweight, scale, bias)
    n, k = qweight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), k)  # not (-1, k): that is ambiguous when k == 0
    if x.dtype == torch.bfloat16 and _int8pack_mm_usable(x2, qweight):
        x2 = x2.contiguous()
        if not _aligned(x2, 64):  # e.g. a view at an odd storage offset: the kernel needs aligned loads
            x2 = x2.clone()
        out = torch.ops.aten._weight_int8pack_mm(x2, qweight, scale.to(torch.bfloat16))
        if bias is not None:
            out.add_(bias)
    else:
        compute_dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
        out = _dequant_mm_blocked(x2.to(compute_dtype), qweight, scale, bias).to(x.dtype)
    return out.reshape(*lead, n)


# --------------------------------------------------------------------------------------------- Triton


# Bound by _triton_kernel() on first use (Triton is an optional dependency).
triton: Any = None
tl: Any = None


@functools.cache
def _triton_kernel() -> Any:
    """Build (once) the Triton kernel; raises ImportError when Triton is not installed.

    Triton is imported here, not at module import, so that ``weir_kernels`` imports (and its CPU
    paths work) without it, and so that ``TRITON_INTERPRET`` is read when the kernel is first used.
    ``triton``/``tl`` are bound as module globals because Triton resolves the names a kernel body uses
    through the function's ``__globals__`` (closure capture only exists in recent Triton releases).
    """
    global triton, tl
    triton = importlib.import_module("triton")
    tl = importlib.import_module("triton.language")

    @triton.jit
    def _int8_linear_kernel(  # type: ignore[no-untyped-def]
        x_ptr,
        w_ptr,
        scale_ptr,
        bias_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_xk,
        stride_wn,
        stride_wk,
        stride_om,
        stride_on,
        HAS_BIAS: tl.constexpr,
        FP32_DOT: tl.constexpr,
        INPUT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr,
    ):
        # Grouped launch order: GROUP_M row-blocks walk the N dimension together, so the weight tiles
        # they share are still in L2 when the next row-block needs them.
        pid = tl.program_id(0)
        num_pid_m = tl.cdiv(M, BLOCK_M)
        num_pid_n = tl.cdiv(N, BLOCK_N)
        num_pid_in_group = GROUP_M * num_pid_n
        group_id = pid // num_pid_in_group
        first_pid_m = group_id * GROUP_M
        group_size_m = min(num_pid_m - first_pid_m, GROUP_M)
        pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
        pid_n = (pid % num_pid_in_group) // group_size_m

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        mask_m = offs_m < M
        mask_n = offs_n < N
        # 64-bit row offsets: M*K or N*K may exceed 2**31 elements.
        x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :] * stride_xk
        # The weight is [N, K] row-major; the tile is read as [BLOCK_K, BLOCK_N] (its transpose).
        w_ptrs = w_ptr + offs_n[None, :].to(tl.int64) * stride_wn + offs_k[:, None] * stride_wk

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_left = K - k * BLOCK_K
            a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
            w = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0)
            # Fused dequantisation, part 1: int8 -> activation dtype is exact (|q| <= 127 fits in
            # fp16/bf16 mantissas), so the tensor-core dot sees the integer weights unchanged.
            if FP32_DOT:
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=INPUT_PRECISION)
            else:
                acc = tl.dot(a, w.to(a.dtype), acc)
            x_ptrs += BLOCK_K * stride_xk
            w_ptrs += BLOCK_K * stride_wk

        # Fused dequantisation, part 2: one multiply per output element by its column's scale.
        scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
        acc = acc * scale[None, :]
        if HAS_BIAS:
            bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0)
            acc = acc + bias[None, :].to(tl.float32)
        out_ptrs = out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])

    return _int8_linear_kernel


_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _triton_config(m: int, dtype: torch.dtype) -> dict[str, int]:
    """Tile sizes by problem shape: small M is memory-bound on the weight (narrow N tiles give more
    programs to spread the weight read over the SMs), large M is compute-bound (big square tiles).
    Hand-picked, not autotuned: autotuning would also run every config under the CPU interpreter."""
    if dtype == torch.float32:  # fp32 tiles need twice the registers/shared memory of 16-bit ones
        if m <= 16:
            return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 4, "num_stages": 3}
    if m <= 16:
        return {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128, "num_warps": 4, "num_stages": 4}
    if m <= 64:
        return {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
    return {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3}


def _is_interpreted(kernel: Any) -> bool:
    """Whether ``kernel`` was built under ``TRITON_INTERPRET=1`` (an InterpretedFunction, not a JITFunction)."""
    return type(kernel).__name__ == "InterpretedFunction"


def linear_triton(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ dequant(qweight).T + bias`` with the Triton kernel; fp16, bf16 or fp32 activations.

    Runs on CUDA tensors, or on CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``).
    fp32 activations use exact fp32 dots unless ``torch.set_float32_matmul_precision`` allows TF32,
    mirroring what ``F.linear`` does. Raises RuntimeError when Triton is not installed.
    """
    _check_args(x, qweight, scale, bias)
    if x.dtype not in _TRITON_DTYPES:
        raise ValueError(f"x: expected dtype float16, bfloat16 or float32, got {x.dtype}")
    try:
        kernel = _triton_kernel()
    except ImportError as exc:
        raise RuntimeError("linear_triton needs the 'triton' package, which is not importable") from exc
    n, k = qweight.shape
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), k)  # not (-1, k): that is ambiguous when k == 0
    m = x2.shape[0]
    out = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return out.reshape(*lead, n)
    scale32 = scale.to(torch.float32).contiguous()
    bias_arg = scale32 if bias is None else bias.contiguous()  # unused pointer when HAS_BIAS is False
    config = _triton_config(m, x.dtype)
    grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]),)
    kernel[grid](
        x2,
        qweight,
        scale32,
        bias_arg,
        out,
        m,
        n,
        k,
        x2.stride(0),
        x2.stride(1),
        qweight.stride(0),
        qweight.stride(1),
        out.stride(0),
        out.stride(1),
        HAS_BIAS=bias is not None,
        # Triton's CPU interpreter (3.9) cannot convert int8 to bf16 nor multiply bf16 tiles (NumPy has no
        # bf16: it computes on the raw bits), so there bf16 tiles are widened to fp32 for the dot; the
        # compiled GPU kernel always feeds bf16/fp16 tiles to the tensor cores.
        FP32_DOT=x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and _is_interpreted(kernel)),
        INPUT_PRECISION="ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32",
        GROUP_M=8,
        **config,
    )
    return out.reshape(*lead, n)


def linear(
    x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """Dispatch: the Triton kernel for CUDA tensors when Triton is importable, else :func:`linear_cpu`."""
    if x.is_cuda and x.dtype in _TRITON_DTYPES and _triton_importable():
        return linear_triton(x, qweight, scale, bias)
    return linear_cpu(x, qweight, scale, bias)


@functools.cache
def _triton_importable() -> bool:
    """Whether ``triton.language`` imports (cached: dispatch asks on every call)."""
    try:
        importlib.import_module("triton.language")
    except ImportError:
        return False
    return True


class Int8WeightOnlyLinear(nn.Module):
    """Drop-in for ``nn.Linear`` holding an int8 weight and per-output-channel fp32 scales.

    The weight, scales and bias are buffers, not parameters: the layer is for inference, and buffers
    move with ``.to(device)`` and are saved in ``state_dict`` like parameters.
    """

    qweight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, device: torch.device | str | None = None
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.register_buffer("qweight", torch.zeros((out_features, in_features), dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, linear: nn.Linear) -> Int8WeightOnlyLinear:
        """Quantise an ``nn.Linear`` (its weight per output channel; the bias is kept in its dtype)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear: expected an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight.device)
        qweight, scale = quantize_weight(weight)
        layer.qweight.copy_(qweight)
        layer.scale.copy_(scale)
        if linear.bias is not None:
            layer.bias = linear.bias.detach().clone()
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.qweight, self.scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
