"""Server settings: one frozen dataclass, each field documented once with its default.

The CLI (``weir serve --help``) and the ``WEIR_*`` environment variables are both generated from
these fields, so a default lives in exactly one place. Precedence: flag > environment > default.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ControlMode(enum.Enum):
    """How models get loaded: all at start (``none``, Triton's default) or by RPC (``explicit``)."""

    NONE = "none"
    EXPLICIT = "explicit"


MAX_SHUTDOWN_GRACE_SECONDS = 3600.0


def _doc(text: str) -> dict[str, str]:
    return {"doc": text}


@dataclass(frozen=True)
class ServerSettings:
    model_repository: Path = field(
        default=Path("model_repository"),
        metadata=_doc("Directory of models: MODEL/config.pbtxt, MODEL/VERSION/model.pt"),
    )
    listen_address: str = field(default="0.0.0.0", metadata=_doc("Address the gRPC and metrics servers bind."))
    grpc_port: int = field(default=8001, metadata=_doc("gRPC port (0 picks a free one; the chosen port is logged)."))
    metrics_port: int = field(
        default=8002, metadata=_doc("Prometheus /metrics port (0 picks a free one, -1 disables).")
    )
    model_control_mode: ControlMode = field(
        default=ControlMode.NONE,
        metadata=_doc(
            "none: load every model at start, refuse load/unload RPCs; explicit: load by RPC or --load-model."
        ),
    )
    load_model: tuple[str, ...] = field(
        default=(), metadata=_doc("In explicit mode, models to load at start (repeatable; '*' loads all).")
    )
    workers: int = field(
        default=1,
        metadata=_doc(
            "Processes serving the gRPC port together (SO_REUSEPORT); each has its own compute threads and, "
            "with a metrics port P > 0, metrics on P + worker index."
        ),
    )
    compute_threads: int = field(default=4, metadata=_doc("Threads that run model compute off the event loop."))
    torch_intra_op_threads: int = field(
        default=0, metadata=_doc("torch intra-op threads per computation (0 keeps torch's default).")
    )
    max_message_bytes: int = field(
        default=128 * 1024 * 1024,
        metadata=_doc(
            "Largest gRPC message accepted or sent, in bytes (gRPC's own default is 4 MiB); a compressed request "
            "is refused once it inflates beyond it."
        ),
    )
    stream_backlog_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=_doc(
            "A ModelStreamInfer stream stops reading requests while the requests it computes and the answers its "
            "client has not read exceed this many bytes (or 256 requests); it reads again as they drain."
        ),
    )
    max_tensor_elements: int = field(
        default=64 * 1024 * 1024, metadata=_doc("Largest element count accepted for one input tensor.")
    )
    max_bytes_elements: int = field(
        default=1024 * 1024,
        metadata=_doc(
            "Largest element count accepted for one BYTES input tensor (each element becomes a Python object)."
        ),
    )
    response_cache_bytes: int = field(
        default=256 * 1024 * 1024,
        metadata=_doc("In-process response cache size in bytes, for models with response_cache { enable: true }."),
    )
    redis_url: str = field(
        default="",
        metadata=_doc("Redis shared by replicas as a second cache tier, e.g. redis://127.0.0.1:6379/0 (empty = none)."),
    )
    redis_ttl_seconds: float = field(default=300.0, metadata=_doc("Lifetime of a response cached in Redis."))
    redis_timeout_ms: float = field(
        default=20.0, metadata=_doc("A Redis call slower than this is abandoned and the cache bypassed.")
    )
    shutdown_grace_seconds: float = field(
        default=15.0,
        metadata=_doc(
            "On SIGTERM, how long in-flight requests may take to finish; new ones are answered UNAVAILABLE, and the "
            "process exits within this plus a few seconds even if a computation still runs."
        ),
    )
    tokens_file: str = field(
        default="",
        metadata=_doc(
            "TOML file of bearer tokens and roles (else WEIR_TOKENS=name:role:token,...); with tokens, load/unload "
            "need the deployer role."
        ),
    )
    require_inference_token: bool = field(
        default=False, metadata=_doc("Inference RPCs need a token too (any role); needs tokens.")
    )
    allow_anonymous_model_control: bool = field(
        default=False,
        metadata=_doc(
            "Let anyone who reaches the port load/unload models: explicit model control on a non-loopback listen "
            "address without tokens is refused at start unless this is set."
        ),
    )
    tls_cert: str = field(default="", metadata=_doc("PEM certificate: serve gRPC over TLS (with --tls-key)."))
    tls_key: str = field(default="", metadata=_doc("PEM private key of --tls-cert."))
    tls_client_ca: str = field(default="", metadata=_doc("PEM CA: require client certificates it signed (mutual TLS)."))
    control_plane: str = field(
        default="",
        metadata=_doc(
            "HOST:PORT of a Weir control plane to follow, or several, comma-separated (replicas of one control "
            "plane: the data plane attaches to one and fails over to the next); the model repository directory "
            "then holds what it deploys."
        ),
    )
    control_plane_token: str = field(
        default="", metadata=_doc("Bearer token for the control plane (prefer the environment variable).")
    )
    control_plane_tls_ca: str = field(default="", metadata=_doc("PEM CA of the control plane: attach over TLS."))
    control_plane_tls_cert: str = field(default="", metadata=_doc("PEM client certificate for mutual TLS."))
    control_plane_tls_key: str = field(default="", metadata=_doc("PEM key of --control-plane-tls-cert."))
    replica_id: str = field(default="", metadata=_doc("This replica's name for the control plane (default host-pid)."))
    heartbeat_seconds: float = field(default=5.0, metadata=_doc("Interval of heartbeats to the control plane."))
    feature_definitions: str = field(
        default="",
        metadata=_doc("TOML feature definitions: models naming a feature service get its features by entity key."),
    )
    online_store: str = field(
        default="",
        metadata=_doc(
            "Online feature store: a redis:// URL, or a SQLite file (default online.db beside the definitions)."
        ),
    )
    log_level: str = field(default="INFO", metadata=_doc("Log level: DEBUG, INFO, WARNING, ERROR."))
    log_format: str = field(default="json", metadata=_doc("Log format: json (one object per line) or text."))

    def __post_init__(self) -> None:
        _require(self.workers >= 1, "workers", "at least 1", self.workers)
        _require(self.compute_threads >= 1, "compute_threads", "at least 1", self.compute_threads)
        _require(self.torch_intra_op_threads >= 0, "torch_intra_op_threads", "0 or more", self.torch_intra_op_threads)
        _require(0 <= self.grpc_port <= 65535, "grpc_port", "0..65535", self.grpc_port)
        _require(-1 <= self.metrics_port <= 65535, "metrics_port", "-1..65535", self.metrics_port)
        _require(self.max_message_bytes >= 1024 * 1024, "max_message_bytes", "at least 1 MiB", self.max_message_bytes)
        _require(
            self.stream_backlog_bytes >= 1024 * 1024,
            "stream_backlog_bytes",
            "at least 1 MiB",
            self.stream_backlog_bytes,
        )
        _require(self.max_tensor_elements >= 1, "max_tensor_elements", "at least 1", self.max_tensor_elements)
        _require(self.max_bytes_elements >= 1, "max_bytes_elements", "at least 1", self.max_bytes_elements)
        _require(self.response_cache_bytes >= 0, "response_cache_bytes", "0 or more", self.response_cache_bytes)
        _require(self.redis_ttl_seconds > 0, "redis_ttl_seconds", "more than 0", self.redis_ttl_seconds)
        _require(self.redis_timeout_ms > 0, "redis_timeout_ms", "more than 0", self.redis_timeout_ms)
        _require(
            not self.redis_url or self.redis_url.startswith(("redis://", "rediss://", "unix://")),
            "redis_url",
            "a redis://, rediss:// or unix:// URL",
            self.redis_url,
        )
        _require(
            0 <= self.shutdown_grace_seconds <= MAX_SHUTDOWN_GRACE_SECONDS,
            "shutdown_grace_seconds",
            f"0..{MAX_SHUTDOWN_GRACE_SECONDS:g}",
            self.shutdown_grace_seconds,
        )
        _require(self.log_format in ("json", "text"), "log_format", "json or text", self.log_format)
        _require(
            all(_is_host_port(address) for address in control_plane_addresses(self.control_plane)),
            "control_plane",
            "HOST:PORT, or several comma-separated",
            self.control_plane,
        )
        _require(self.heartbeat_seconds > 0, "heartbeat_seconds", "more than 0", self.heartbeat_seconds)
        _require(bool(self.tls_cert) == bool(self.tls_key), "tls_cert/tls_key", "both or neither", self.tls_cert)
        _require(not self.tls_client_ca or bool(self.tls_cert), "tls_client_ca", "--tls-cert and --tls-key too", "none")
        _require(
            self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
            "log_level",
            "DEBUG, INFO, WARNING or ERROR",
            self.log_level,
        )


def control_plane_addresses(text: str) -> tuple[str, ...]:
    """The control planes of --control-plane A,B,... (duplicates once each, in order)."""
    return tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))


def _is_host_port(address: str) -> bool:
    """HOST:PORT ([V6]:PORT too), or a gRPC target with a scheme (dns:///name:port)."""
    if "://" in address or address.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
        return True
    host, _, port = address.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) <= 65535 and "," not in host


def _require(condition: bool, name: str, expected: str, received: object) -> None:
    if not condition:
        raise ValueError(f"setting {name}: expected {expected}, got {received!r}")


def settings_fields() -> tuple[dataclasses.Field[Any], ...]:
    return dataclasses.fields(ServerSettings)


def environment_variable(field_name: str) -> str:
    return "WEIR_" + field_name.upper()
