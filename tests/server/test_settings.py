"""ServerSettings validation and the `weir serve` command line built from it: flag > WEIR_*
environment variable > default, errors that name the flag or setting, and --help."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from weir.cli import build_parser, settings_from
from weir.settings import ControlMode, ServerSettings, control_plane_addresses, environment_variable, settings_fields

# The settings a user can give, written out so that one disappearing from the CLI is noticed.
EXPECTED_FIELDS = [
    "model_repository",
    "listen_address",
    "grpc_port",
    "metrics_port",
    "model_control_mode",
    "load_model",
    "workers",
    "compute_threads",
    "torch_intra_op_threads",
    "max_message_bytes",
    "stream_backlog_bytes",
    "max_tensor_elements",
    "max_bytes_elements",
    "response_cache_bytes",
    "redis_url",
    "redis_ttl_seconds",
    "redis_timeout_ms",
    "shutdown_grace_seconds",
    "tokens_file",
    "require_inference_token",
    "allow_anonymous_model_control",
    "tls_cert",
    "tls_key",
    "tls_client_ca",
    "control_plane",
    "control_plane_token",
    "control_plane_tls_ca",
    "control_plane_tls_cert",
    "control_plane_tls_key",
    "replica_id",
    "heartbeat_seconds",
    "feature_definitions",
    "online_store",
    "log_level",
    "log_format",
]


def settings(argv: list[str], environ: dict[str, str] | None = None) -> ServerSettings:
    return settings_from(build_parser().parse_args(["serve", *argv]), environ or {})


def exit_message(argv: list[str], environ: dict[str, str] | None = None) -> str:
    with pytest.raises(SystemExit) as caught:
        settings(argv, environ)
    assert isinstance(caught.value.code, str), caught.value.code
    return caught.value.code


# --- ServerSettings --------------------------------------------------------------------------


def test_settings_fields_are_the_expected_ones() -> None:
    assert [field.name for field in settings_fields()] == EXPECTED_FIELDS
    assert all(field.metadata.get("doc") for field in settings_fields())


@pytest.mark.parametrize(
    ("name", "value", "expected"),
    [
        ("compute_threads", 0, "at least 1"),
        ("torch_intra_op_threads", -1, "0 or more"),
        ("grpc_port", -1, "0..65535"),
        ("grpc_port", 65536, "0..65535"),
        ("metrics_port", -2, "-1..65535"),
        ("metrics_port", 65536, "-1..65535"),
        ("max_message_bytes", 1024 * 1024 - 1, "at least 1 MiB"),
        ("max_tensor_elements", 0, "at least 1"),
        ("stream_backlog_bytes", 1024 * 1024 - 1, "at least 1 MiB"),
        ("shutdown_grace_seconds", -0.5, "0..3600"),
        ("shutdown_grace_seconds", float("nan"), "0..3600"),
        ("shutdown_grace_seconds", float("inf"), "0..3600"),
        ("log_format", "xml", "json or text"),
        ("log_level", "TRACE", "DEBUG, INFO, WARNING or ERROR"),
        ("control_plane", "control:8011,control", "HOST:PORT, or several comma-separated"),
        ("control_plane", "control:http", "HOST:PORT, or several comma-separated"),
    ],
)
def test_invalid_setting_is_refused_naming_the_setting_and_both_values(name: str, value: object, expected: str) -> None:
    with pytest.raises(ValueError) as caught:
        ServerSettings(**{name: value})  # type: ignore[arg-type]

    assert str(caught.value) == f"setting {name}: expected {expected}, got {value!r}"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("compute_threads", 1),
        ("torch_intra_op_threads", 0),
        ("grpc_port", 0),
        ("grpc_port", 65535),
        ("metrics_port", -1),
        ("max_message_bytes", 1024 * 1024),
        ("max_tensor_elements", 1),
        ("shutdown_grace_seconds", 0.0),
        ("shutdown_grace_seconds", 3600.0),
        ("stream_backlog_bytes", 1024 * 1024),
        ("log_format", "text"),
        ("log_level", "debug"),
    ],
)
def test_boundary_values_are_accepted(name: str, value: object) -> None:
    assert getattr(ServerSettings(**{name: value}), name) == value  # type: ignore[arg-type]


def test_settings_are_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        ServerSettings().grpc_port = 1  # type: ignore[misc]


# --- flag > environment > default ------------------------------------------------------------


def test_no_flag_and_no_environment_gives_the_dataclass_defaults() -> None:
    assert settings([]) == ServerSettings()
    assert ServerSettings().grpc_port == 8001 and ServerSettings().model_control_mode is ControlMode.NONE


@pytest.mark.parametrize(
    ("name", "flag_value", "env_value", "from_flag", "from_env"),
    [
        ("model_repository", "/models/a", "/models/b", Path("/models/a"), Path("/models/b")),
        ("listen_address", "127.0.0.1", "::", "127.0.0.1", "::"),
        ("grpc_port", "9001", "9002", 9001, 9002),
        ("metrics_port", "-1", "0", -1, 0),
        ("model_control_mode", "none", "explicit", ControlMode.NONE, ControlMode.EXPLICIT),
        ("compute_threads", "8", "2", 8, 2),
        ("torch_intra_op_threads", "3", "5", 3, 5),
        ("max_message_bytes", "2097152", "4194304", 2097152, 4194304),
        ("max_tensor_elements", "100", "200", 100, 200),
        ("shutdown_grace_seconds", "2.5", "0", 2.5, 0.0),
        ("log_level", "DEBUG", "WARNING", "DEBUG", "WARNING"),
        ("log_format", "json", "text", "json", "text"),
        ("load_model", "a", "b,c", ("a",), ("b", "c")),
    ],
)
def test_flag_beats_environment_beats_default(
    name: str, flag_value: str, env_value: str, from_flag: object, from_env: object
) -> None:
    flag = "--" + name.replace("_", "-")
    environ = {environment_variable(name): env_value}
    default = getattr(ServerSettings(), name)
    # The environment must change the default and the flag must change the environment's value.
    assert from_env != default and from_flag != from_env

    assert getattr(settings([flag, flag_value], environ), name) == from_flag
    assert getattr(settings([], environ), name) == from_env
    assert getattr(settings([]), name) == default
    assert getattr(settings([flag, flag_value]), name) == from_flag


def test_environment_variables_are_weir_prefixed_upper_case_field_names() -> None:
    assert environment_variable("grpc_port") == "WEIR_GRPC_PORT"
    assert environment_variable("load_model") == "WEIR_LOAD_MODEL"


def test_unrelated_environment_variables_are_ignored() -> None:
    assert settings([], {"GRPC_PORT": "1", "WEIR_GRPC": "2", "weir_grpc_port": "3"}) == ServerSettings()


# --- errors that name the flag or the variable -----------------------------------------------


@pytest.mark.parametrize(
    ("argv", "environ", "fragments"),
    [
        (["--grpc-port", "abc"], {}, ["--grpc-port", "expected an integer", "'abc'"]),
        (["--compute-threads", "2.5"], {}, ["--compute-threads", "an integer", "'2.5'"]),
        (["--shutdown-grace-seconds", "soon"], {}, ["--shutdown-grace-seconds", "a number", "'soon'"]),
        ([], {"WEIR_METRICS_PORT": "eighty"}, ["WEIR_METRICS_PORT", "an integer", "'eighty'"]),
        ([], {"WEIR_GRPC_PORT": ""}, ["WEIR_GRPC_PORT", "an integer", "''"]),
        (
            [],
            {"WEIR_MODEL_CONTROL_MODE": "EXPLICIT"},
            ["WEIR_MODEL_CONTROL_MODE", "one of none, explicit", "'EXPLICIT'"],
        ),
    ],
    ids=["flag-int", "flag-int-float", "flag-float", "env-int", "env-empty", "env-enum"],
)
def test_value_that_does_not_convert_exits_naming_its_source(
    argv: list[str], environ: dict[str, str], fragments: list[str]
) -> None:
    message = exit_message(argv, environ)

    assert message.startswith("weir: ")
    missing = [fragment for fragment in fragments if fragment not in message]
    assert not missing, f"{message!r} lacks {missing}"


def test_flag_error_names_the_flag_even_when_the_environment_is_valid() -> None:
    message = exit_message(["--grpc-port", "x"], {"WEIR_GRPC_PORT": "9000"})
    assert "--grpc-port" in message and "WEIR_GRPC_PORT" not in message


@pytest.mark.parametrize(
    ("argv", "environ", "fragments"),
    [
        (["--grpc-port", "70000"], {}, ["--grpc-port / WEIR_GRPC_PORT", "0..65535", "70000"]),
        ([], {"WEIR_COMPUTE_THREADS": "0"}, ["--compute-threads / WEIR_COMPUTE_THREADS", "at least 1", "0"]),
        (["--log-format", "xml"], {}, ["--log-format / WEIR_LOG_FORMAT", "json or text", "'xml'"]),
    ],
)
def test_value_out_of_range_exits_naming_the_setting(
    argv: list[str], environ: dict[str, str], fragments: list[str]
) -> None:
    message = exit_message(argv, environ)
    assert message.startswith("weir: ")
    assert all(fragment in message for fragment in fragments), message


def test_control_mode_flag_only_accepts_its_choices(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        build_parser().parse_args(["serve", "--model-control-mode", "poll"])

    assert caught.value.code == 2
    error = capsys.readouterr().err
    assert "--model-control-mode" in error and "'poll'" in error and "explicit" in error


# --- --load-model ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--load-model", "a"], ("a",)),
        (["--load-model", "a", "--load-model", "b"], ("a", "b")),
        (["--load-model", "a,b", "--load-model", " c , d ,"], ("a", "b", "c", "d")),
        (["--load-model", "*"], ("*",)),
        (["--load-model", ""], ()),
    ],
    ids=["one", "repeated", "comma-separated-and-repeated", "all", "empty"],
)
def test_load_model_is_repeatable_and_comma_separated(argv: list[str], expected: tuple[str, ...]) -> None:
    assert settings(argv).load_model == expected


def test_load_model_from_environment_is_comma_separated_and_replaced_by_the_flag() -> None:
    environ = {"WEIR_LOAD_MODEL": "x, y,,z"}
    assert settings([], environ).load_model == ("x", "y", "z")
    assert settings(["--load-model", "a"], environ).load_model == ("a",)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a:1", ("a:1",)),
        ("a:1,b:2", ("a:1", "b:2")),
        (" a:1 , b:2 ,a:1,", ("a:1", "b:2")),
        ("[::1]:8011,dns:///control.internal:8011", ("[::1]:8011", "dns:///control.internal:8011")),
        ("", ()),
    ],
    ids=["one", "two", "spaces-and-duplicates", "ipv6-and-dns", "none"],
)
def test_control_plane_takes_several_addresses(text: str, expected: tuple[str, ...]) -> None:
    assert control_plane_addresses(settings(["--control-plane", text]).control_plane) == expected
    assert control_plane_addresses(settings([], {"WEIR_CONTROL_PLANE": text}).control_plane) == expected


# --- weir serve --help -----------------------------------------------------------------------


def test_serve_help_lists_every_flag_with_its_environment_variable_and_default() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "weir.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "COLUMNS": "100"},
        check=False,
    )
    assert result.returncode == 0, result.stderr

    # One entry per option: from its "  --flag" line to the next.
    entries = {
        match.group(1): " ".join(match.group(2).split())
        for match in re.finditer(r"^  (--[a-z-]+)(.*?)(?=^  -|\Z)", result.stdout, re.MULTILINE | re.DOTALL)
    }
    expected_defaults = {field.name: field.default for field in settings_fields()}
    expected_defaults["model_control_mode"] = "none"
    expected_defaults["load_model"] = "none"
    for name in EXPECTED_FIELDS:
        flag = "--" + name.replace("_", "-")
        assert flag in entries, f"{flag} missing from:\n{result.stdout}"
        entry = entries[flag]
        assert f"[env WEIR_{name.upper()}" in entry, entry
        assert f"default: {expected_defaults[name]}]" in entry, entry
    assert "comma-separated" in entries["--load-model"]
    assert "{none,explicit}" in entries["--model-control-mode"]


def test_max_bytes_elements_flag_reaches_the_settings_and_is_checked() -> None:
    assert settings(["--max-bytes-elements", "4096"]).max_bytes_elements == 4096
    assert settings([]).max_bytes_elements == 1024 * 1024
    assert "--max-bytes-elements" in exit_message(["--max-bytes-elements", "0"])
