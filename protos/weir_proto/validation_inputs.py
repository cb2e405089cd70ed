"""A model version's validation inputs: an npz file (``validation.npz`` in the version directory),
one array per model input, that the accuracy gate of a lowered precision runs the model on.

The file comes from a user (``weir models push --validation``) and is opened by both planes, so it
is checked before anything reads its arrays: a zip of at most ``MAX_VALIDATION_ARRAYS`` ``.npy``
members, no object (pickled) dtype in any of them, at most ``MAX_VALIDATION_ARRAY_BYTES`` of array
data in all (the sizes the zip declares, which bound what reading a member yields, so a small file
that inflates without end is refused too), and no array header declaring more data than its member
holds (numpy allocates the declared size before reading). Only the members' ``.npy`` headers are read.
"""

from __future__ import annotations

import zipfile
from io import BytesIO
from pathlib import Path

import numpy as np

from weir_proto.errors import InvalidArgumentError

VALIDATION_FILENAME = "validation.npz"
MAX_VALIDATION_BYTES = 64 * 1024 * 1024  # the file as uploaded
MAX_VALIDATION_ARRAY_BYTES = 256 * 1024 * 1024  # its arrays, inflated
MAX_VALIDATION_ARRAYS = 256
_HEADER_BYTES = 64 * 1024  # an .npy header is a short dict literal


def check_validation_npz(path: Path, where: str) -> None:
    """Refuse (``InvalidArgumentError`` naming ``where``) a file that is not a bounded npz of plain
    numeric arrays."""
    try:
        size = path.stat().st_size
        if size > MAX_VALIDATION_BYTES:
            raise InvalidArgumentError(f"{where}: expected at most {MAX_VALIDATION_BYTES} bytes, got {size}")
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if not members or len(members) > MAX_VALIDATION_ARRAYS:
                raise InvalidArgumentError(
                    f"{where}: expected 1 to {MAX_VALIDATION_ARRAYS} arrays (an npz, one array per input), "
                    f"got {len(members)}"
                )
            declared = sum(member.file_size for member in members)
            if declared > MAX_VALIDATION_ARRAY_BYTES:
                raise InvalidArgumentError(
                    f"{where}: expected at most {MAX_VALIDATION_ARRAY_BYTES} bytes of arrays, the npz holds {declared}"
                )
            for member in members:
                _check_member(archive, member, where)
    except InvalidArgumentError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as error:
        raise InvalidArgumentError(
            f"{where}: expected an npz (numpy.savez), got something else ({type(error).__name__}: {str(error)[:200]})"
        ) from None


def _check_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo, where: str) -> None:
    name = member.filename[:80]
    if not member.filename.endswith(".npy"):
        raise InvalidArgumentError(f"{where}: expected only .npy arrays in the npz, got member {name!r}")
    with archive.open(member) as handle:
        head = handle.read(_HEADER_BYTES)
    stream = BytesIO(head)
    version = np.lib.format.read_magic(stream)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(stream)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(stream)
    else:
        raise InvalidArgumentError(f"{where}: array {name!r}: unsupported .npy format version {version}")
    if dtype.hasobject:
        raise InvalidArgumentError(
            f"{where}: array {name!r} holds Python objects (a pickle): expected numbers (e.g. float32 rows)"
        )
    elements = 1
    for length in shape:
        elements *= int(length)
    if elements * dtype.itemsize > member.file_size:  # numpy allocates what the header says before reading
        raise InvalidArgumentError(
            f"{where}: array {name!r}: its header declares {elements * dtype.itemsize} bytes of data, the npz "
            f"holds {member.file_size} for it"
        )
