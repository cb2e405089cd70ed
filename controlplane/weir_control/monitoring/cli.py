"""`weir drift ...`: drift monitoring on the control plane.

    weir drift policy ENDPOINT [--window-seconds S] [--min-records N] [--threshold NAME=WARN:CRIT ...]
        [--webhook URL] [--retrain] [--cooldown S] [--max-windows N]
    weir drift reference ENDPOINT (--window START END | --serving-lineage | --parquet PATH under the feature root)
    weir drift status ENDPOINT                 # the latest window, feature by feature
    weir drift report ENDPOINT [--out DIR] [--windows N]   # Markdown + self-contained HTML with PNG plots
    weir drift feedback ENDPOINT (--label REQUEST_ID=VALUE ... | --file LABELS.jsonl)

Times are ISO 8601 (a zone-less time is UTC). LABELS.jsonl: one {"request_id": ..., "label": ...} per line.
Every command prints JSON with --json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from weir_control.cli_common import channel_of, report_error, token_of
from weir_proto.errors import InvalidArgumentError, WeirError, error_for_status


def add_commands(subcommands: Any) -> None:
    drift = subcommands.add_parser("drift", help="drift monitoring: policy, reference, status, report, feedback")
    actions = drift.add_subparsers(dest="drift_command", required=True)

    def command(name: str, text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=text)
        parser.add_argument("endpoint")
        parser.add_argument("--control-plane", default=os.environ.get("WEIR_CONTROL_PLANE", "127.0.0.1:8011"))
        parser.add_argument("--token", default=os.environ.get("WEIR_TOKEN"), help="bearer token [env WEIR_TOKEN]")
        parser.add_argument("--tls-ca", type=Path, help="CA bundle: talk TLS to the control plane")
        parser.add_argument("--json", action="store_true")
        return parser

    policy = command("policy", "set how an endpoint's drift is judged and acted on")
    policy.add_argument("--window-seconds", type=float, default=0.0)
    policy.add_argument("--min-records", type=int, default=0)
    policy.add_argument("--threshold", action="append", default=[], metavar="NAME=WARNING:CRITICAL")
    policy.add_argument("--webhook", default="", help="POST a JSON alert here on critical drift")
    policy.add_argument("--retrain", action="store_true", help="submit a retraining job on critical drift")
    policy.add_argument("--cooldown", type=float, default=0.0, help="seconds between actions")
    policy.add_argument("--max-windows", type=int, default=0)
    reference = command("reference", "set what the endpoint's windows are compared with")
    source = reference.add_mutually_exclusive_group(required=True)
    source.add_argument("--window", nargs=2, metavar=("START", "END"), help="a traffic window")
    source.add_argument("--serving-lineage", action="store_true", help="the serving version's training data")
    source.add_argument(
        "--parquet", help="a Parquet file inside the control plane's feature root (a relative path: from that root)"
    )
    command("status", "the latest window, feature by feature")
    report = command("report", "write Markdown and HTML (PNG plots) for an endpoint")
    report.add_argument("--out", type=Path, default=Path("."))
    report.add_argument("--windows", type=int, default=0, help="the latest N windows (0: all kept)")
    feedback = command("feedback", "ground-truth labels for earlier requests (by request id)")
    feedback.add_argument("--label", action="append", default=[], metavar="REQUEST_ID=VALUE")
    feedback.add_argument("--file", type=Path, help="JSON lines: request_id, label")


def _time(text: str, field: str) -> Any:
    from google.protobuf.timestamp_pb2 import Timestamp

    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise InvalidArgumentError(f"{field}: expected an ISO 8601 time, got {text!r}") from None
    stamp = Timestamp()
    stamp.FromDatetime(moment if moment.tzinfo else moment.replace(tzinfo=datetime.UTC))
    return stamp


def _label(target: Any, request_id: str, value: Any) -> None:
    label = target.add(request_id=str(request_id))
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            label.number = float(str(value))
        except ValueError:
            label.text = str(value)
    else:
        label.number = float(value)


def run(args: argparse.Namespace) -> int:
    try:
        return _run(args)
    except WeirError as error:
        return report_error(args, error)


def _run(args: argparse.Namespace) -> int:
    from weir_proto.auth import client_metadata
    from weir_proto.control.v1 import monitoring_pb2, monitoring_pb2_grpc

    token = token_of(args)
    channel = channel_of(args)
    stub = monitoring_pb2_grpc.MonitoringStub(channel)

    def call(method: str, request: Any) -> Any:
        try:
            return getattr(stub, method)(request, metadata=client_metadata(token), timeout=120)
        except grpc.RpcError as error:
            raise error_for_status(error.code(), error.details() or "") from error

    try:
        command = args.drift_command
        if command == "policy":
            policy = monitoring_pb2.MonitoringPolicy(
                endpoint=args.endpoint, window_seconds=args.window_seconds, min_records=args.min_records,
                webhook_url=args.webhook, retrain=args.retrain, cooldown_seconds=args.cooldown,
                max_windows=args.max_windows,
            )  # fmt: skip
            for item in args.threshold:
                name, _, levels = item.partition("=")
                warning, _, critical = levels.partition(":")
                try:
                    policy.thresholds[name].CopyFrom(
                        monitoring_pb2.Thresholds(warning=float(warning), critical=float(critical))
                    )
                except ValueError:
                    raise InvalidArgumentError(f"--threshold: expected NAME=WARNING:CRITICAL, got {item!r}") from None
            result = call("SetMonitoringPolicy", policy)
        elif command == "reference":
            request = monitoring_pb2.SetReferenceRequest(endpoint=args.endpoint)
            if args.window:
                request.window.start.CopyFrom(_time(args.window[0], "START"))
                request.window.end.CopyFrom(_time(args.window[1], "END"))
            elif args.serving_lineage:
                request.serving_lineage = True
            else:
                request.parquet_path = args.parquet
            result = call("SetReference", request)
        elif command == "feedback":
            request = monitoring_pb2.RecordFeedbackRequest(endpoint=args.endpoint)
            for item in args.label:
                request_id, separator, value = item.partition("=")
                if not separator:
                    raise InvalidArgumentError(f"--label: expected REQUEST_ID=VALUE, got {item!r}")
                _label(request.labels, request_id, value)
            if args.file:
                for number, line in enumerate(args.file.read_text().splitlines(), 1):
                    if line.strip():
                        try:
                            document = json.loads(line)
                            _label(request.labels, document["request_id"], document["label"])
                        except (ValueError, KeyError, TypeError) as error:
                            raise InvalidArgumentError(
                                f"--file line {number}: expected {{'request_id': ..., 'label': ...}}, got {line!r}"
                            ) from error
            result = call("RecordFeedback", request)
        else:
            report = call("GetDriftReport", monitoring_pb2.GetDriftReportRequest(
                endpoint=args.endpoint, windows=1 if command == "status" else args.windows
            ))  # fmt: skip
            if command == "report":
                from weir_control.monitoring.report import render

                markdown, html = render(report, args.out)
                summary = {"markdown": str(markdown), "html": str(html), "windows": len(report.windows)}
                print(json.dumps(summary, indent=2) if args.json else f"wrote {markdown} and {html}")
                return 0
            result = report
            if not args.json:
                print(_status_text(report))
                return 0
        if args.json or command != "feedback":
            print(json.dumps(json_format.MessageToDict(result, preserving_proto_field_name=True), indent=2))
        else:
            held = f", held {result.held} (until their requests' records arrive)" if result.held else ""
            held += f", {result.duplicate} already labelled (not counted again)" if result.duplicate else ""
            print(f"matched {result.matched}, unmatched {result.unmatched}{held}")
        return 0
    finally:
        channel.close()


def _status_text(report: Any) -> str:
    from weir_control.monitoring.report import SEVERITY_TEXT  # lazily: `weir` builds every parser at start

    lines = [
        f"endpoint {report.endpoint}: {report.records_received} records received, {report.records_dropped} dropped"
    ]
    follows = " (follows the serving version)" if report.reference.serving_lineage else ""
    lines.append(f"reference: {report.reference.source or 'none set (weir drift reference)'}{follows}")
    if report.labels_held or report.labels_unmatched:
        lines.append(
            f"feedback: {report.labels_held} labels waiting for their requests' records, "
            f"{report.labels_unmatched} never matched"
        )
    if not report.windows:
        return "\n".join([*lines, "no window closed yet"])
    window = report.windows[-1]
    lines.append(
        f"latest window {window.start.ToJsonString()} .. {window.end.ToJsonString()}: {window.records} records, "
        f"{SEVERITY_TEXT.get(window.severity, '?')}"
    )
    for feature in window.features:
        lines.append(
            f"  {feature.name:<32} {SEVERITY_TEXT.get(feature.severity, '?'):<10} psi={feature.psi:.3f} "
            f"ks={feature.ks_statistic:.3f} jsd={feature.jensen_shannon:.3f} {'; '.join(feature.reasons)}"
        )
    if window.concept.labelled:
        concept = window.concept
        lines.append(
            f"  concept: {concept.labelled} labels, accuracy {concept.accuracy:.3f} "
            f"(reference {concept.reference_accuracy:.3f}), {concept.detector_state}"
        )
    return "\n".join(lines)
