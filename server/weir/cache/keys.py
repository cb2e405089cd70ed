"""Response cache keys: a pure function of everything that can change a model's answer.

The key is a BLAKE2b digest over a byte stream in which every component is length-delimited or
counted, so two different requests can never produce the same stream (input name "ab" with
element "c" is not "a" with "bc"). A collision of the digest itself would need a 256-bit hash
collision.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping, Sequence

import numpy as np

KEY_SIZE = 32

# Bumped whenever the stream layout below changes, so keys written by an older Weir into a shared
# Redis are never read as if they had been computed the new way.
_KEY_FORMAT = b"weir-resp-key-v1"

# Transport and scheduling parameters: they change when and how a request runs, never its answer.
# ``triton_*`` parameters are Triton's own (e.g. triton_enable_empty_final_response) and likewise
# steer the transport.
IGNORED_PARAMETERS = frozenset({"priority", "timeout", "routing_key", "headers"})
IGNORED_PARAMETER_PREFIX = "triton_"

_COUNT = struct.Struct("<Q")
_DIMENSION = struct.Struct("<q")
_ELEMENT_LENGTH = struct.Struct("<I")  # as in the V2 raw BYTES form: no element can exceed it on the wire
_FLOAT = struct.Struct("<d")

# One tag per parameter value type, so 1, 1.0, True and "1" give four different keys.
_TAG_NONE = b"n"
_TAG_BOOL = b"b"
_TAG_INT = b"i"
_TAG_FLOAT = b"f"
_TAG_STR = b"s"
_TAG_BYTES = b"y"


def response_cache_key(
    model_name: str,
    model_version: str,
    inputs: Mapping[str, tuple[str, np.ndarray]],
    requested_outputs: Sequence[str],
    parameters: Mapping[str, object],
) -> bytes:
    """The 32-byte cache key of a request.

    ``inputs`` maps each input name to its V2 datatype name and its array; ``requested_outputs``
    are the output names in response order (order matters: it is the order of the answer);
    ``parameters`` are the request's parameters, of which those in ``IGNORED_PARAMETERS`` or
    starting with ``IGNORED_PARAMETER_PREFIX`` are left out. Raises TypeError for a parameter
    value or BYTES element of a type the key cannot encode unambiguously.
    """
    digest = hashlib.blake2b(digest_size=KEY_SIZE, person=_KEY_FORMAT)
    _feed_text(digest, model_name)
    _feed_text(digest, model_version)

    digest.update(_COUNT.pack(len(inputs)))
    for name in sorted(inputs):
        datatype, array = inputs[name]
        _feed_text(digest, name)
        _feed_text(digest, datatype)
        digest.update(_COUNT.pack(array.ndim))
        for dimension in array.shape:
            digest.update(_DIMENSION.pack(dimension))
        if array.dtype == object:
            _feed_bytes_elements(digest, name, array)
        else:
            _feed_numeric_data(digest, array)

    digest.update(_COUNT.pack(len(requested_outputs)))
    for output in requested_outputs:
        _feed_text(digest, output)

    relevant = sorted(name for name in parameters if affects_answer(name))
    digest.update(_COUNT.pack(len(relevant)))
    for name in relevant:
        _feed_text(digest, name)
        _feed_parameter_value(digest, name, parameters[name])
    return digest.digest()


def affects_answer(parameter_name: str) -> bool:
    """Whether a request parameter is part of the cache key."""
    return parameter_name not in IGNORED_PARAMETERS and not parameter_name.startswith(IGNORED_PARAMETER_PREFIX)


def _feed_text(digest: hashlib.blake2b, text: str) -> None:
    _feed_blob(digest, text.encode("utf-8"))


def _feed_blob(digest: hashlib.blake2b, blob: bytes | memoryview) -> None:
    digest.update(_COUNT.pack(len(blob)))
    digest.update(blob)


def _feed_numeric_data(digest: hashlib.blake2b, array: np.ndarray) -> None:
    if array.size == 0:
        digest.update(_COUNT.pack(0))  # memoryview refuses to cast a view with a zero in its shape
        return
    # Decoded raw inputs are already contiguous views of the request's bytes: hashing them in place
    # avoids copying what may be megabytes per request. Only a strided array gets copied.
    data = np.ascontiguousarray(array).data.cast("B")
    _feed_blob(digest, data)


def _feed_bytes_elements(digest: hashlib.blake2b, name: str, array: np.ndarray) -> None:
    digest.update(_COUNT.pack(array.size))
    for element in array.flat:
        if not isinstance(element, bytes | bytearray):
            raise TypeError(f"input '{name}': expected BYTES elements of type bytes, got {type(element).__name__}")
        digest.update(_ELEMENT_LENGTH.pack(len(element)))
        digest.update(element)


def _feed_parameter_value(digest: hashlib.blake2b, name: str, value: object) -> None:
    # bool before int: True is an int to isinstance, but not to a model reading the parameter.
    if value is None:
        digest.update(_TAG_NONE)
    elif isinstance(value, bool):
        digest.update(_TAG_BOOL + (b"\x01" if value else b"\x00"))
    elif isinstance(value, int):
        # Decimal text: int64 and uint64 parameters alike, no range to overflow.
        digest.update(_TAG_INT)
        _feed_text(digest, str(value))
    elif isinstance(value, float):
        digest.update(_TAG_FLOAT + _FLOAT.pack(value))
    elif isinstance(value, str):
        digest.update(_TAG_STR)
        _feed_text(digest, value)
    elif isinstance(value, bytes):
        digest.update(_TAG_BYTES)
        _feed_blob(digest, value)
    else:
        # Anything else has no canonical byte form; repr() could make two different values collide.
        raise TypeError(
            f"parameter '{name}': expected a bool, int, float, str or bytes value, got {type(value).__name__}"
        )
