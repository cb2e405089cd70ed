"""Weir's custom compute kernels for the accelerated backends.

Each kernel comes in three implementations of one function, plus a dispatcher:

* a **torch reference** (``*_reference``): the plain definition in torch ops - slow, obviously right,
  and the ground truth every other implementation is tested against;
* a **CPU fallback** (``*_cpu``): the fastest path torch itself offers on CPU (fused aten kernels,
  preallocated outputs, blocked work that stays in cache); it is also correct on any device;
* a **Triton GPU kernel** (``*_triton``): a kernel in the Triton language that fuses the whole
  operation into one pass over memory (dequantisation inside the GEMM's K loop; convert, normalise
  and transpose of images in a single read and write).

Dispatch (:func:`linear`, :func:`preprocess`): CUDA tensors go to the Triton kernel when ``triton``
is importable; everything else - CPU tensors, or CUDA without Triton - goes to the CPU fallback.
Triton is imported lazily, at a kernel's first use, so this package imports and its CPU paths work
without it.

Testing without a GPU: with ``TRITON_INTERPRET=1`` in the environment *before a kernel is first
used*, Triton runs its kernels in a NumPy interpreter on CPU tensors, so ``linear_triton`` and
``preprocess_triton`` can be checked against the references on any machine (slowly: keep shapes small).

Kernels:

* :mod:`weir_kernels.int8_linear` - int8 weight-only linear (per-output-channel scales) with fused
  dequantisation, and :class:`Int8WeightOnlyLinear`, a drop-in for ``nn.Linear``;
* :mod:`weir_kernels.preprocess` - uint8 HWC/NHWC images to normalised float CHW/NCHW.
"""

from __future__ import annotations

from weir_kernels import int8_linear as _int8_linear
from weir_kernels.int8_linear import (
    Int8WeightOnlyLinear,
    dequantize_weight,
    linear,
    linear_cpu,
    linear_reference,
    linear_triton,
    quantize_weight,
)
from weir_kernels.preprocess import preprocess, preprocess_cpu, preprocess_reference, preprocess_triton

__all__ = [
    "Int8WeightOnlyLinear",
    "dequantize_weight",
    "linear",
    "linear_cpu",
    "linear_reference",
    "linear_triton",
    "preprocess",
    "preprocess_cpu",
    "preprocess_reference",
    "preprocess_triton",
    "quantize_weight",
    "triton_available",
]


def triton_available() -> bool:
    """Whether the ``triton`` package imports here, i.e. whether CUDA tensors get the Triton kernels.

    It says nothing about a GPU being present: under ``TRITON_INTERPRET=1`` the kernels also run on CPU.
    """
    return _int8_linear._triton_importable()
