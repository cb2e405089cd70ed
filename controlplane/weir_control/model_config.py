"""What the registry checks in a version's config.pbtxt, and the signature it derives from it.

The data plane validates a config fully when it loads it; the registry checks enough to refuse a
version no data plane could serve (unparsable text, no inputs or outputs, unknown datatypes, a number
or file name out of the bounds both planes share in ``weir_proto.model_config_limits``, a
default_model_filename other than the artifact's), so a bad config fails at push time with the field
named, not later on every replica.
"""

from __future__ import annotations

from google.protobuf import text_format

from weir_proto.common.v1 import types_pb2
from weir_proto.errors import InvalidArgumentError
from weir_proto.inference import messages as inference
from weir_proto.model_config_limits import check_config_limits

ARTIFACT_FILENAMES = ("model.pt", "model.pt2")  # TorchScript, torch.export


def signature_from_config(config_pbtxt: str, artifact_filename: str = "") -> types_pb2.ModelSignature:
    """The signature of a version's config, refused (naming the field) when no data plane could serve
    it; ``artifact_filename``, when given, is the name the version's model file will have."""
    config = inference.ModelConfig()
    try:
        text_format.Parse(config_pbtxt, config)
    except text_format.ParseError as error:
        raise InvalidArgumentError(f"config_pbtxt: expected a ModelConfig in text format, got: {error}") from error
    if config.max_batch_size < 0:
        raise InvalidArgumentError(f"config_pbtxt max_batch_size: expected 0 or more, got {config.max_batch_size}")
    check_config_limits(config, "config_pbtxt")
    if artifact_filename and config.default_model_filename not in ("", artifact_filename):
        raise InvalidArgumentError(
            f"config_pbtxt default_model_filename: expected '' or the artifact's name {artifact_filename!r}, got "
            f"{config.default_model_filename[:128]!r} (the data plane would find no model file)"
        )
    signature = types_pb2.ModelSignature(max_batch_size=config.max_batch_size)
    for field, tensors, target in (
        ("input", config.input, signature.inputs),
        ("output", config.output, signature.outputs),
    ):
        if not tensors:
            raise InvalidArgumentError(f"config_pbtxt {field}: expected at least one {field}, got none")
        for tensor in tensors:
            type_name = inference.DataType.Name(tensor.data_type)
            datatype = type_name.removeprefix("TYPE_")
            if datatype == "STRING":
                datatype = "BYTES"
            if datatype not in types_pb2.DataType.keys() or datatype == "DATA_TYPE_UNSPECIFIED":  # noqa: SIM118
                raise InvalidArgumentError(
                    f"config_pbtxt {field} '{tensor.name}' data_type: expected a V2 datatype, got {type_name}"
                )
            shape = ([-1] if config.max_batch_size > 0 else []) + list(tensor.dims)
            target.add(
                name=tensor.name,
                datatype=types_pb2.DataType.Value(datatype),
                shape=shape,
                optional=getattr(tensor, "optional", False),
            )
    return signature


def check_artifact_filename(name: str) -> str:
    if name not in ARTIFACT_FILENAMES:
        raise InvalidArgumentError(f"artifact_filename: expected one of {list(ARTIFACT_FILENAMES)}, got {name!r}")
    return name
