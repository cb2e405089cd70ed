"""What a model file must be before anything loads it: a TorchScript or torch.export archive with no
pickled Python payload, judged from the zip alone (nothing is unpickled, torch is not imported).

The registry runs this on every upload and the data plane before every load, so both planes refuse the
same files for the same reasons. Why each rule exists:

- ``torch.save(module)`` files (legacy pickle, or a zip whose ``data.pkl`` has no TorchScript code)
  are unpickled by ``torch.load``: arbitrary code. Refused.
- TorchScript (``torch.jit.save``) keeps its ``data.pkl``/``constants.pkl`` at the archive's root;
  ``torch.jit.load`` reads them with TorchScript's own unpickler, which builds only TorchScript types.
  Any other pickle member is refused.
- torch.export (``torch.export.save``) keeps weights and constants as raw tensor bytes, except entries
  its weights/constants config marks ``use_pickle`` (read with ``torch.load(weights_only=False)``),
  constants of TorchScript classes or opaque objects (unpickled), legacy ``data/weights/<model>.pt``
  files, and an older archive format at the zip's top level: all refused. Its sample inputs are a
  ``torch.save`` archive that ``torch.export.load`` reads with ``weights_only=True`` and, if that
  fails, with ``weights_only=False``: their pickle may only name the globals a tensor needs (checked
  opcode by opcode), so even the fallback cannot call anything else. AOTInductor packages (compiled
  shared libraries) are refused.
"""

from __future__ import annotations

import enum
import io
import json
import pickletools
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from weir_proto.errors import InvalidArgumentError

MAX_CONFIG_BYTES = 64 * 1024 * 1024  # a weights/constants config JSON
MAX_SAMPLE_INPUTS_BYTES = 256 * 1024 * 1024  # a torch.export archive's sample inputs (a torch.save zip)
MAX_PICKLE_BYTES = 64 * 1024 * 1024  # one pickle scanned inside the sample inputs
MAX_PROGRAM_BYTES = 64 * 1024 * 1024  # a torch.export program's JSON read for its signature

_PICKLE_PROTOCOL_PREFIXES = tuple(bytes([0x80, protocol]) for protocol in range(2, 6))
_ZIP_PREFIX = b"PK\x03\x04"
_SAVE_HINT = (
    "Save the model as TorchScript (torch.jit.script/trace + torch.jit.save, model.pt) or with "
    "torch.export.save (model.pt2)."
)

# What a pickle of tensors (torch.save of a tuple/dict of tensors) may name: the weights-only set.
_STORAGE_TYPES = [
    "UntypedStorage",
    "FloatStorage",
    "DoubleStorage",
    "HalfStorage",
    "BFloat16Storage",
    "LongStorage",
    "IntStorage",
    "ShortStorage",
    "CharStorage",
    "ByteStorage",
    "BoolStorage",
    "ComplexFloatStorage",
    "ComplexDoubleStorage",
]
_DTYPES = [
    "float32",
    "float64",
    "float16",
    "bfloat16",
    "int64",
    "int32",
    "int16",
    "int8",
    "uint8",
    "bool",
    "complex64",
    "complex128",
    "float8_e4m3fn",
    "float8_e5m2",
    "uint16",
    "uint32",
    "uint64",
]
TENSOR_PICKLE_GLOBALS = frozenset(
    {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("collections", "OrderedDict"),
        ("torch", "Size"),
        ("torch", "device"),
        *(("torch", name) for name in _STORAGE_TYPES),
        *(("torch", name) for name in _DTYPES),
    }
)
# The pickles torch.jit.save writes at a TorchScript archive's root (traced_inputs.pkl: torch.jit.trace's
# example inputs); torch.jit.load reads them with TorchScript's C++ unpickler, never Python's.
TORCHSCRIPT_PICKLES = ("data.pkl", "constants.pkl", "traced_inputs.pkl")
# Opcodes that reach a global other than through a visible (module, name) pair, or a Python class.
_OPAQUE_GLOBAL_OPCODES = frozenset({"INST", "OBJ", "EXT1", "EXT2", "EXT4", "PERSID"})
_STRING_OPCODES = frozenset(
    {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING", "BINSTRING", "STRING"}
)
_MEMO_PUT_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT", "MEMOIZE"})
_MEMO_GET_OPCODES = frozenset({"GET", "BINGET", "LONG_BINGET"})


class ArtifactKind(enum.Enum):
    TORCHSCRIPT = "torchscript"  # torch.jit.save: model.pt
    EXPORT = "export"  # torch.export.save: model.pt2


EXPECTED_KIND_BY_FILENAME = {"model.pt": ArtifactKind.TORCHSCRIPT, "model.pt2": ArtifactKind.EXPORT}


class UnsafeArtifactError(InvalidArgumentError):
    """A model file that carries a pickled payload (or compiled code): refused, never loaded."""


class NotAnArchiveError(InvalidArgumentError):
    """A model file that is neither a TorchScript nor a torch.export archive."""


def inspect_artifact(path: Path, label: str = "") -> ArtifactKind:
    """The archive's kind, or ``UnsafeArtifactError``/``NotAnArchiveError`` saying why it is refused.
    ``label`` names the file in messages (default: its path)."""
    where = label or str(path)
    try:
        with path.open("rb") as handle:
            return inspect_stream(handle, where)
    except OSError as error:
        raise NotAnArchiveError(f"{where}: cannot read the model file: {error.strerror or error}") from error


def inspect_stream(handle: IO[bytes], where: str) -> ArtifactKind:
    head = handle.read(4)
    handle.seek(0)
    if head[:2] in _PICKLE_PROTOCOL_PREFIXES:
        raise UnsafeArtifactError(
            f"{where}: refusing to load a pickled Python object (torch.save's legacy format): unpickling can run "
            f"arbitrary code. {_SAVE_HINT}"
        )
    if head != _ZIP_PREFIX:
        raise NotAnArchiveError(
            f"{where}: not a TorchScript/torch.export archive (expected a zip archive, the file starts with "
            f"{head!r}). {_SAVE_HINT}"
        )
    try:
        with zipfile.ZipFile(handle) as archive:
            return _inspect_archive(archive, where)
    except InvalidArgumentError:
        raise
    except Exception as error:  # zipfile, zlib, lzma, bz2 or json on a damaged archive: refused, never loaded
        raise NotAnArchiveError(
            f"{where}: not a TorchScript/torch.export archive (a broken zip: {type(error).__name__}: "
            f"{str(error)[:200]})"
        ) from error


def check_expected_kind(kind: ArtifactKind, filename: str, where: str) -> None:
    """A registry artifact's name says how the data plane loads it: the content must agree."""
    expected = EXPECTED_KIND_BY_FILENAME.get(filename)
    if expected is not None and expected != kind:
        raise NotAnArchiveError(
            f"{where}: artifact_filename {filename!r} expects a {expected.value} archive, the file is a "
            f"{kind.value} archive"
        )


def export_user_input_count(path: Path) -> int | None:
    """How many user inputs a torch.export archive's program takes (from its models/*.json, nothing
    loaded), or None when the archive does not say (no single program, or one too large to read here)."""
    try:
        with zipfile.ZipFile(path) as archive:
            programs = [
                info
                for info in archive.infolist()
                if _relative(info.filename).startswith("models/") and info.filename.endswith(".json")
            ]
            if len(programs) != 1 or programs[0].file_size > MAX_PROGRAM_BYTES:
                return None
            document = json.loads(_read_bounded(archive, programs[0], MAX_PROGRAM_BYTES, str(path)))
        specs = document["graph_module"]["signature"]["input_specs"]
        return sum(1 for spec in specs if isinstance(spec, dict) and "user_input" in spec)
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile, UnsafeArtifactError):
        return None


def _relative(name: str) -> str:
    """A member's name below the archive's root folder (torch writes every member under one)."""
    return name.split("/", 1)[1] if "/" in name else name


def _inspect_archive(archive: zipfile.ZipFile, where: str) -> ArtifactKind:
    names = [info.filename for info in archive.infolist()]
    relative = [_relative(name) for name in names]
    is_export = any(
        rel == "archive_format" or (rel.startswith("models/") and rel.endswith(".json")) for rel in relative
    )
    if is_export:
        _check_export(archive, where)
        return ArtifactKind.EXPORT
    has_code = any(rel.startswith("code/") for rel in relative)
    if "data.pkl" in relative and not has_code:
        raise UnsafeArtifactError(
            f"{where}: refusing to load a pickled Python object (torch.save of a module or state dict): "
            f"unpickling can run arbitrary code. {_SAVE_HINT}"
        )
    if not (has_code and "constants.pkl" in relative):
        raise NotAnArchiveError(
            f"{where}: not a TorchScript/torch.export archive (a zip without TorchScript code or a torch.export "
            f"program). {_SAVE_HINT}"
        )
    for name, rel in zip(names, relative, strict=True):
        if rel.endswith(".pkl") and rel not in TORCHSCRIPT_PICKLES:
            raise UnsafeArtifactError(
                f"{where}: refusing a TorchScript archive with the extra pickle member {_shown(name)} (only "
                f"{', '.join(TORCHSCRIPT_PICKLES)} at its root, read by TorchScript's own unpickler, are allowed)"
            )
    return ArtifactKind.TORCHSCRIPT


def _check_export(archive: zipfile.ZipFile, where: str) -> None:
    raw_payloads: set[str] = set()  # data/weights/<file>, data/constants/<file> read as raw tensor bytes
    for info in archive.infolist():
        name, rel = info.filename, _relative(info.filename)
        if "/" not in name:
            raise UnsafeArtifactError(
                f"{where}: refusing a torch.export archive with the top-level member {_shown(name)} (the older format, "
                f"whose files torch.export.load unpickles). Save it again with torch.export.save."
            )
        if rel.startswith("data/aotinductor/") or rel.endswith((".so", ".dll", ".dylib")):
            raise UnsafeArtifactError(
                f"{where}: refusing a torch.export archive with compiled code ({_shown(name)}, AOTInductor): "
                "loading it runs native code. Upload the torch.export.save archive instead."
            )
        if rel.endswith(".pkl"):
            raise UnsafeArtifactError(f"{where}: refusing a torch.export archive with the pickle member {_shown(name)}")
        if rel.startswith(("data/weights/", "data/constants/")) and rel.endswith("_config.json"):
            raw_payloads |= _check_payload_config(archive, info, where)
    for info in archive.infolist():
        name, rel = info.filename, _relative(info.filename)
        if rel.startswith(("data/weights/", "data/constants/")) and not rel.endswith("_config.json"):
            if rel not in raw_payloads:
                raise UnsafeArtifactError(
                    f"{where}: refusing a torch.export archive with the payload {_shown(name)} that its "
                    "weights/constants config does not list as raw tensor bytes (a legacy pickled state dict)"
                )
        elif rel.startswith("data/sample_inputs/"):
            _check_sample_inputs(archive, info, where)


def _check_payload_config(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> set[str]:
    """Refuse pickled entries of a weights/constants config; return the raw payload members it names."""
    name = info.filename
    directory = "data/weights/" if _relative(name).startswith("data/weights/") else "data/constants/"
    try:
        document = json.loads(_read_bounded(archive, info, MAX_CONFIG_BYTES, where))
        entries = document["config"]
        if not isinstance(entries, dict):
            raise TypeError("'config' is not an object")
    except (ValueError, KeyError, TypeError) as error:
        raise NotAnArchiveError(
            f"{where}: {_shown(name)}: expected torch.export's payload config JSON ({str(error)[:200]})"
        ) from error
    raw: set[str] = set()
    for fqn, entry in entries.items():
        entry = entry if isinstance(entry, dict) else {}
        path_name = str(entry.get("path_name", ""))
        if entry.get("use_pickle"):
            raise UnsafeArtifactError(
                f"{where}: refusing a torch.export archive whose {_payload_kind(directory)} {str(fqn)[:128]!r} is "
                "pickled (use_pickle in its payload config): torch.export.load would unpickle it with "
                "weights_only=False, which can run arbitrary code. Export tensors only."
            )
        if not path_name or path_name.startswith(("custom_obj_", "opaque_obj_")) or "/" in path_name:
            raise UnsafeArtifactError(
                f"{where}: refusing a torch.export archive whose {_payload_kind(directory)} {str(fqn)[:128]!r} is "
                f"stored as {path_name[:128]!r} (a TorchScript-class or opaque object, unpickled on load): export "
                "tensors only."
            )
        raw.add(directory + path_name)
    return raw


def _payload_kind(directory: str) -> str:
    return "weight" if directory == "data/weights/" else "constant"


def _check_sample_inputs(archive: zipfile.ZipFile, info: zipfile.ZipInfo, where: str) -> None:
    name = info.filename
    data = _read_bounded(archive, info, MAX_SAMPLE_INPUTS_BYTES, where)
    if not data.startswith(_ZIP_PREFIX):
        raise UnsafeArtifactError(
            f"{where}: refusing a torch.export archive whose sample inputs {_shown(name)} are not a torch.save zip "
            "(a legacy pickle would be unpickled on load)"
        )
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as inner:
            for member in inner.infolist():
                if member.filename.endswith(".pkl"):
                    pickle_bytes = _read_bounded(inner, member, MAX_PICKLE_BYTES, f"{where}: {name}")
                    what = f"sample inputs ({_shown(member.filename)} in {_shown(name)})"
                    _check_tensor_pickle(pickle_bytes, f"{where}: refusing a torch.export archive whose {what}")
    except InvalidArgumentError:
        raise
    except Exception as error:  # a damaged inner zip: refused, never loaded
        raise NotAnArchiveError(
            f"{where}: sample inputs {_shown(name)}: a broken zip ({type(error).__name__})"
        ) from error


def _check_tensor_pickle(data: bytes, where: str) -> None:
    """Every global the pickle names must be one a tensor needs; a global it reaches in a way that
    cannot be read statically is refused (nothing is unpickled to find out)."""
    recent: list[str | None] = []  # values the last opcodes pushed: strings, or None for anything else
    memo: dict[int, str | None] = {}
    try:
        for opcode, argument, _ in _opcodes(data):
            op = opcode.name
            if op in _OPAQUE_GLOBAL_OPCODES:
                raise UnsafeArtifactError(f"{where} use the pickle opcode {op}, which reaches code indirectly")
            if op == "GLOBAL":
                module, _, attribute = str(argument).partition(" ")
                _check_global(module, attribute, where)
                recent.append(None)
            elif op == "STACK_GLOBAL":
                if len(recent) < 2 or not isinstance(recent[-2], str) or not isinstance(recent[-1], str):
                    raise UnsafeArtifactError(f"{where} name a computed global (STACK_GLOBAL)")
                _check_global(recent[-2], recent[-1], where)
                recent.append(None)
            elif op in _STRING_OPCODES:
                recent.append(argument if isinstance(argument, str) else None)
            elif op in _MEMO_PUT_OPCODES:
                memo[len(memo) if op == "MEMOIZE" else int(argument)] = recent[-1] if recent else None
            elif op in _MEMO_GET_OPCODES:
                recent.append(memo.get(int(argument)))
            else:
                recent.append(None)
            del recent[:-2]
    except UnsafeArtifactError:
        raise
    except Exception as error:  # pickletools' own complaint about malformed opcodes
        raise UnsafeArtifactError(f"{where} are a malformed pickle ({type(error).__name__}: {error})") from error


def _opcodes(data: bytes) -> Iterator[tuple[Any, Any, int | None]]:
    return pickletools.genops(data)


def _check_global(module: str, attribute: str, where: str) -> None:
    if (module, attribute) not in TENSOR_PICKLE_GLOBALS:
        raise UnsafeArtifactError(
            f"{where} name {f'{module}.{attribute}'[:200]!r} (only tensors, storages and dtypes may appear; unpickled "
            "with weights_only=False on load, it could run arbitrary code)"
        )


def _shown(name: str) -> str:
    """A member name as messages show it: quoted and clipped (zip names may be 64 KiB long)."""
    return repr(name) if len(name) <= 200 else repr(name[:200]) + "..."


def _read_bounded(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int, where: str) -> bytes:
    """A member's bytes, refusing more than ``limit`` whatever its header claims (a zip bomb stops here)."""
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise UnsafeArtifactError(
            f"{where}: member {_shown(info.filename)} is larger than {limit} bytes (Weir's limit)"
        )
    return data
