"""Where drift alerts may be sent: only to destinations the operator allows (``weir control
--webhook-allow``, repeatable; none by default), so a deployer's policy cannot make the control plane
call its own loopback services, a cloud metadata address (169.254.169.254) or the private network.

An entry is one of:

- ``HOST`` or ``HOST:PORT``: a DNS name (any port, or that port). A URL naming it is accepted, and at
  send time the name is resolved and only *public* addresses are used; a name that resolves to a
  loopback, link-local, private or otherwise non-global address is refused unless that address is
  itself allowed by an address entry (DNS answers can change after the policy was checked);
- ``ADDRESS``, ``ADDRESS:PORT``, ``[IPV6]:PORT`` or ``CIDR`` (e.g. ``127.0.0.1:9000``, ``10.0.0.0/8``):
  URLs naming such an address, and names resolving to it, may reach it, loopback and private included.

The URL is checked when a policy is set and again at send time, after resolution; the connection goes
to the very address that was checked (no second lookup), without proxies and without following
redirects. What is recorded (and shown to viewers in reports) is the HTTP status code only, never the
receiver's answer or the connection error's text.
"""

from __future__ import annotations

import http.client
import ipaddress
import logging
import re
import socket
import ssl
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from weir_proto.errors import InvalidArgumentError

log = logging.getLogger(__name__)

ALLOW_FLAG = "weir control --webhook-allow HOST[:PORT]|ADDRESS[:PORT]|CIDR"
MAX_URL_CHARS = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}
_NAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class WebhookRefused(Exception):
    """The destination is not (or no longer) allowed; nothing was sent."""


@dataclass(frozen=True)
class AllowEntry:
    text: str
    name: str | None = None  # a DNS name, lower case
    network: Network | None = None
    port: int | None = None  # None: any port

    def allows_port(self, port: int) -> bool:
        return self.port is None or self.port == port


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise InvalidArgumentError(f"--webhook-allow: expected a port 1-65535 in {entry!r}, got {text!r}")
    return int(text)


def _address(text: str) -> Address | None:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return _unmapped(address)


def _unmapped(address: Address) -> Address:
    """An IPv4-mapped IPv6 address (::ffff:127.0.0.1) is judged as the IPv4 address it carries."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def parse_allow_entry(text: str) -> AllowEntry:
    entry = text.strip()
    if "/" in entry:
        try:
            return AllowEntry(text, network=ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise InvalidArgumentError(f"--webhook-allow: expected a CIDR like 10.0.0.0/8, got {text!r}") from None
    whole = _address(entry)
    if whole is not None:  # a bare address (IPv6 included: its colons are not a port)
        return AllowEntry(text, network=ipaddress.ip_network(whole))
    port: int | None = None
    host = entry
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        if rest:
            if not rest.startswith(":"):
                raise InvalidArgumentError(f"--webhook-allow: expected [IPV6]:PORT, got {text!r}")
            port = _port(rest[1:], text)
    elif ":" in entry:
        host, _, port_text = entry.rpartition(":")
        port = _port(port_text, text)
    address = _address(host)
    if address is not None:
        return AllowEntry(text, network=ipaddress.ip_network(address), port=port)
    name = host.lower().rstrip(".")
    if not _NAME.match(name):
        raise InvalidArgumentError(
            f"--webhook-allow: expected HOST[:PORT], ADDRESS[:PORT], [IPV6]:PORT or CIDR, got {text!r}"
        )
    return AllowEntry(text, name=name, port=port)


@dataclass(frozen=True)
class Destination:
    scheme: str
    host: str  # as the URL names it (lower case, no brackets)
    port: int
    target: str  # path and query
    literal: Address | None  # the host, when the URL names an address


class WebhookAllowList:
    def __init__(self, entries: Iterable[str] = ()) -> None:
        self.entries = tuple(parse_allow_entry(text) for text in entries)

    def describe(self) -> str:
        return ", ".join(entry.text for entry in self.entries) or "none"

    # -- when a policy is set (and again before each send) --

    def check_url(self, url: str) -> Destination:
        """The URL's destination if an entry allows it; InvalidArgumentError naming ``webhook_url`` else."""
        if len(url) > MAX_URL_CHARS:
            raise InvalidArgumentError(f"webhook_url: expected at most {MAX_URL_CHARS} characters, got {len(url)}")
        try:
            parts = urllib.parse.urlsplit(url)
            port = parts.port
        except ValueError as error:
            raise InvalidArgumentError(f"webhook_url: expected an http(s) URL, got {url[:200]!r} ({error})") from None
        scheme = parts.scheme.lower()
        host = (parts.hostname or "").rstrip(".")
        if scheme not in _DEFAULT_PORTS or not host:
            raise InvalidArgumentError(f"webhook_url: expected an http(s) URL with a host, got {url[:200]!r}")
        destination = Destination(
            scheme=scheme,
            host=host,
            port=port or _DEFAULT_PORTS[scheme],
            target=(parts.path or "/") + (f"?{parts.query}" if parts.query else ""),
            literal=_address(host),
        )
        if not any(self._url_matches(entry, destination) for entry in self.entries):
            shown = f"[{host}]" if ":" in host else host
            raise InvalidArgumentError(
                f"webhook_url: expected a destination the operator allows ({ALLOW_FLAG}; allowed: "
                f"{self.describe()}), got {shown}:{destination.port}"
            )
        return destination

    @staticmethod
    def _url_matches(entry: AllowEntry, destination: Destination) -> bool:
        if not entry.allows_port(destination.port):
            return False
        if destination.literal is not None:
            return entry.network is not None and destination.literal in entry.network
        return entry.name is not None and entry.name == destination.host

    # -- at send time --

    def address_allowed(self, address: Address, destination: Destination) -> bool:
        """Whether the connection may go to ``address`` (one the destination's host resolved to)."""
        address = _unmapped(address)
        for entry in self.entries:
            if entry.network is not None and address in entry.network and entry.allows_port(destination.port):
                return True  # listed by address: loopback and private included, as the operator chose
        named = destination.literal is None and any(
            entry.name == destination.host and entry.allows_port(destination.port) for entry in self.entries
        )
        return named and address.is_global and not address.is_multicast

    def resolve(self, url: str) -> tuple[Destination, str]:
        """The destination and the one address to connect to, both checked; WebhookRefused otherwise."""
        try:
            destination = self.check_url(url)  # the allow-list may have changed since the policy was set
        except InvalidArgumentError as error:
            raise WebhookRefused(error.message) from None
        if destination.literal is not None:
            candidates: list[str] = [str(destination.literal)]
        else:
            try:
                answers = socket.getaddrinfo(destination.host, destination.port, type=socket.SOCK_STREAM)
            except OSError as error:
                raise WebhookRefused(f"{destination.host} does not resolve: {error}") from None
            candidates = list(dict.fromkeys(str(answer[4][0]) for answer in answers))
        for candidate in candidates:
            address = _address(candidate.split("%", 1)[0])
            if address is not None and self.address_allowed(address, destination):
                return destination, candidate
        raise WebhookRefused(
            f"{destination.host} resolves to {candidates}, none of them allowed ({ALLOW_FLAG}; "
            "names reach public addresses only unless the address itself is listed)"
        )

    def post(self, url: str, body: bytes, timeout: float) -> int:
        """POST ``body`` as JSON to the checked address; the HTTP status (redirects are not followed)."""
        destination, address = self.resolve(url)
        connection: http.client.HTTPConnection
        if destination.scheme == "https":
            connection = _PinnedHTTPSConnection(destination.host, destination.port, address, timeout)
        else:
            connection = _PinnedHTTPConnection(destination.host, destination.port, address, timeout)
        try:
            connection.request("POST", destination.target, body=body, headers={"Content-Type": "application/json"})
            response = connection.getresponse()
            response.read(65536)  # not kept: a receiver's answer is never shown
            return response.status
        finally:
            connection.close()


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """Connects to the checked address; the Host header still names the URL's host."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._address = address

    def connect(self) -> None:
        self.sock = socket.create_connection((self._address, self.port), self.timeout)


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """The same over TLS: the certificate is verified against the URL's host name."""

    def __init__(self, host: str, port: int, address: str, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]
