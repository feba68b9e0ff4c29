"""Which image URLs a job may fetch: the pure policy half of ``fetch.py`` (no I/O but an injectable DNS resolver).

Manifests come from users, so an image URL is untrusted input: without these checks a manifest line such as
``http://169.254.169.254/latest/meta-data/...`` or ``file:///etc/passwd`` would make a worker read cloud credentials or
local files and hand them back as "images" (SSRF / local file disclosure), and ``s3://other-bucket/secrets`` would
read any object the job's credentials reach. Hence: http(s) hosts must resolve to public addresses (``check_http_url``;
``fetch.py`` then connects to exactly the addresses checked), local paths stay in the manifest's folder
(``resolve_local_path``), object-store schemes are allowed by list (``classify``) and object-store URLs stay in the
manifest's own bucket or an allowed prefix (``check_object_url``).
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import re
import socket
from dataclasses import dataclass
from typing import Callable
from urllib.parse import unquote, urlsplit

from urllib3.exceptions import LocationParseError
from urllib3.util import parse_url


class FetchError(Exception):
    """A failed fetch. ``code`` is one of ``fetch_failed``, ``fetch_timeout``, ``not_found``, ``too_large``,
    ``unsafe_url``, ``opted_out``; ``retryable`` marks transient failures (5xx, 429, resets, timeouts)."""

    def __init__(self, code: str, message: str, *, retryable: bool = False, retry_after: float | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retryable = retryable
        self.retry_after = retry_after  # seconds a server asked us to wait (Retry-After on 429/503), if it did

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


@dataclass(frozen=True)
class FetchPolicy:
    # Off by default: a worker usually runs inside a VPC next to metadata services and internal APIs (SSRF).
    allow_private_network: bool = False
    # Off by default: only files in the manifest's own folder, so a manifest cannot read e.g. ~/.aws/credentials.
    allow_local_files: bool = False
    # Per connect and per read, not for the whole body: a healthy server sends *something* well within 30 s.
    timeout_s: float = 30.0
    # Retries after the first try, for transient errors only (5xx, 429, resets, timeouts).
    retries: int = 3
    # Sleep before retry k (0-based) is drawn between half and all of backoff_s * 2**k (jitter, so that the tasks
    # a throttled host refused do not come back in lockstep): at most 0.5, 1, 2 s, 3.5 s in all with the defaults.
    # A 429/503 with Retry-After waits what the server asked instead (a little more, never less).
    backoff_s: float = 0.5
    # 50 MiB is far above any real photo but bounds a worker's memory against huge or endless bodies.
    max_bytes: int = 50 * 2**20
    # What browsers and CDNs need in practice; more is almost always a loop.
    max_redirects: int = 5
    # Images one fetch task downloads at once (threads sharing one pooled HTTP session).
    concurrency: int = 8
    # The most one image may take, redirects, retries and waits included; past it the image fails with
    # fetch_timeout. An http(s) download is cut at the deadline even while bytes still trickle in; an object-store
    # read is bounded by its backend's own timeouts and the deadline is checked between tries.
    deadline_s: float = 120.0
    # Object-store URL prefixes (s3://bucket/prefix/, gs://bucket/, ...) image URLs may read besides the manifest's
    # own bucket (the job's --allow-prefix). Matched on whole path segments: s3://b/img allows s3://b/img/x.png but
    # not s3://b/img2/x.png. See ``check_object_url``.
    allowed_prefixes: tuple[str, ...] = ()
    # On by default, as img2dataset: an image whose response carries one of these X-Robots-Tag directives (for every
    # agent, or for ours) is not used: its row ends ``opted_out``. Empty: the header is not looked at.
    disallowed_directives: tuple[str, ...] = ("noai", "noimageai", "noindex", "noimageindex")

    def __post_init__(self) -> None:
        if isinstance(self.allowed_prefixes, str):
            object.__setattr__(self, "allowed_prefixes", (self.allowed_prefixes,))
        object.__setattr__(self, "allowed_prefixes", tuple(self.allowed_prefixes))
        for prefix in self.allowed_prefixes:
            object_location(prefix, what="--allow-prefix", error=ValueError)
        object.__setattr__(self, "disallowed_directives", tuple(d.lower() for d in self.disallowed_directives))
        if int(self.concurrency) < 1:
            raise ValueError(f"fetch concurrency must be at least 1, got {self.concurrency}")
        if not self.deadline_s > 0:
            raise ValueError(f"the per-image fetch deadline must be positive, got {self.deadline_s}")


Resolver = Callable[[str, "int | None"], "list[str]"]

#: The agent token an X-Robots-Tag may address (``X-Robots-Tag: ddim-edit: noai``), besides directives for all agents.
AGENT_TOKEN = "ddim-edit"


def opt_out_directive(values: list[str], disallowed: tuple[str, ...], agent: str = AGENT_TOKEN) -> str | None:
    """The first disallowed directive among a response's ``X-Robots-Tag`` values that applies to us, or None.

    A value is ``directive, directive`` (for every agent) or ``agent: directive, ...`` (for that agent only), as in
    img2dataset and Google's documentation of the header.
    """
    for value in values:
        head, sep, rest = value.partition(":")
        target, directives = (head.strip().lower(), rest) if sep else (None, value)
        if target is not None and target not in (agent, "*"):
            continue
        for directive in (d.strip().lower() for d in directives.split(",")):
            if directive in disallowed:
                return directive
    return None


def default_resolver(host: str, port: int | None) -> list[str]:
    """All addresses ``host`` resolves to (what a connection could end up using), in order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if ip.ipv4_mapped is not None:  # ::ffff:a.b.c.d
        return ip.ipv4_mapped
    if ip.sixtofour is not None:  # 2002:AABB:CCDD::/48
        return ip.sixtofour
    if ip in ipaddress.IPv6Network("64:ff9b::/96"):  # NAT64 well-known prefix
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def is_public_address(ip: str) -> bool:
    """True only for globally routable unicast addresses; False for anything unparsable (fail closed)."""
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])  # drop an IPv6 zone id ("fe80::1%eth0")
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address):
        inner = _embedded_ipv4(addr)
        if inner is not None:
            return is_public_address(str(inner))
    # is_global alone is not enough: it is True for multicast (224/4); is_private covers 10/8, 172.16/12,
    # 192.168/16, fc00::/7 (and more); CGNAT 100.64/10 is neither private nor global.
    return addr.is_global and not (
        addr.is_private
        or addr.is_loopback
        or addr.is_link_local  # 169.254/16 (cloud metadata 169.254.169.254), fe80::/10
        or addr.is_multicast
        or addr.is_unspecified
        or addr.is_reserved
    )


# What inet_aton accepts as an IPv4 literal: "127.1", "2130706433", "0x7f000001", "0177.0.0.1".
_LEGACY_IPV4 = re.compile(r"^(0x[0-9a-f]+|[0-9]+)(\.(0x[0-9a-f]+|[0-9]+)){0,3}$", re.IGNORECASE)


def _literal_addresses(host: str) -> list[str] | None:
    """The address of an IP-literal host, parsed here (no resolver involved), or None for a name."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    if _LEGACY_IPV4.match(host):
        try:
            return [socket.inet_ntoa(socket.inet_aton(host))]  # same parse the C library does when connecting
        except OSError:
            raise FetchError("unsafe_url", f"malformed IPv4 address {host!r}") from None
    return None


def check_http_url(url: str, policy: FetchPolicy, resolve: Resolver = default_resolver) -> list[str]:
    """Check one http(s) hop before connecting to it; returns the addresses the host resolved to."""
    # Parse with urllib3, the parser requests connects with: urllib.parse disagrees on some inputs
    # ("http://127.0.0.1\\@evil.com/" is evil.com to urlsplit but 127.0.0.1 to requests).
    try:
        parts = parse_url(url.strip())
    except LocationParseError as e:
        raise FetchError("unsafe_url", f"malformed URL {url!r}: {e}") from None
    if (parts.scheme or "").lower() not in ("http", "https"):
        raise FetchError("unsafe_url", f"{url!r} is not an http(s) URL")
    host, port = (parts.host or "").strip("[]"), parts.port
    if not host:
        raise FetchError("unsafe_url", f"{url!r} has no host")
    addresses = _literal_addresses(host)
    if addresses is None:
        try:
            addresses = list(resolve(host, port))
        except (OSError, UnicodeError) as e:
            raise FetchError("fetch_failed", f"cannot resolve {host!r}: {e}") from None
        if not addresses:
            raise FetchError("fetch_failed", f"{host!r} resolved to no address")
    if not policy.allow_private_network:
        bad = [a for a in addresses if not is_public_address(a)]
        if bad:
            raise FetchError(
                "unsafe_url",
                f"{url} resolves to non-public address {', '.join(bad)}; pass --allow-private-network to allow it",
            )
    return addresses


def resolve_local_path(url_or_path: str, base_dir: str | None, policy: FetchPolicy) -> str:
    """The real path of a plain path or ``file://`` URL, refused (``unsafe_url``) outside the manifest's folder.

    The check is on the realpath (symlinks resolved); a symlink swapped in between this check and the open is not
    covered (TOCTOU), which is acceptable for a folder the job's own user controls.
    """
    path = url_or_path
    if urlsplit(url_or_path).scheme.lower() == "file":
        parts = urlsplit(url_or_path)
        if parts.netloc not in ("", "localhost"):
            raise FetchError("unsafe_url", f"{url_or_path}: file URLs on another host are not supported")
        path = unquote(parts.path)
    if not path:
        raise FetchError("unsafe_url", f"{url_or_path!r} is an empty path")
    if not os.path.isabs(path):
        path = os.path.join(base_dir if base_dir is not None else os.getcwd(), path)
    real = os.path.realpath(path)
    if policy.allow_local_files:
        return real
    if base_dir is None:
        raise FetchError(
            "unsafe_url",
            f"{url_or_path} is a local path but the manifest is not local; pass --allow-local-files to allow it",
        )
    base = os.path.realpath(base_dir)
    if os.path.commonpath([real, base]) != base:
        raise FetchError(
            "unsafe_url",
            f"{url_or_path} is outside the manifest's folder {base}; pass --allow-local-files to allow it",
        )
    return real


# fsspec protocols an image URL may use, by list (everything else is ``unsafe_url``), each with its store's family:
# s3a:// is s3://, gcs:// is gs://, abfs(s):// is az://. Left out on purpose: local disk under other names (local,
# dir, arrow_hdfs...), clients that reach any host (ftp, sftp, smb, webdav, http via fsspec: SSRF without our
# checks), wrappers and chaining that carry another URL inside (zip, tar, reference, simplecache, "a::b").
# ``memory`` is the process's own in-memory store: it reaches nothing outside the worker (tests use it).
# file:// and plain paths are "local" (resolve_local_path's rules); http(s) go through check_http_url.
OBJECT_STORE_SCHEMES: dict[str, str] = {
    "s3": "s3", "s3a": "s3", "gs": "gs", "gcs": "gs", "az": "az", "abfs": "az", "abfss": "az", "hf": "hf",
    "memory": "memory",
}
_HF_REPO_KINDS = ("datasets", "spaces", "models")


def classify(url: str) -> str:
    """``"http"``, ``"local"`` (plain path or ``file://``) or ``"fsspec"`` (an allowed object store, see
    ``OBJECT_STORE_SCHEMES``); any other scheme is ``unsafe_url``."""
    scheme = urlsplit(url).scheme.lower()
    if not scheme:
        return "local"
    if scheme in ("http", "https"):
        return "http"
    if scheme == "file":
        return "local"
    if scheme in OBJECT_STORE_SCHEMES:
        if "::" in url:
            raise FetchError("unsafe_url", f"chained fsspec URLs are not allowed: {url}")
        if "://" not in url:
            raise FetchError("unsafe_url", f"{url!r} is not a URL of the form {scheme}://bucket/key")
        return "fsspec"
    allowed = ", ".join(["http", "https", "file", *OBJECT_STORE_SCHEMES])
    raise FetchError("unsafe_url", f"URL scheme {scheme!r} is not allowed (allowed: {allowed})")


@dataclass(frozen=True)
class ObjectLocation:
    """Where an object-store URL points: ``family`` (s3, gs, az, hf, memory), ``container`` (the bucket, the Azure
    container as written with its account, the Hugging Face repo without revision) and ``key`` (the rest)."""

    family: str
    container: str
    key: str

    @property
    def root(self) -> str:
        return f"{self.family}://{self.container}/"

    def within(self, prefix: "ObjectLocation") -> bool:
        if (self.family, self.container) != (prefix.family, prefix.container):
            return False
        base = prefix.key.rstrip("/")
        return not base or self.key == base or self.key.startswith(base + "/")


def object_location(url: str, *, what: str = "image URL", error: type[Exception] = FetchError) -> ObjectLocation:
    """Parse an object-store URL (or prefix) into family, container and key; refuse dot segments ("..", ".") and
    URLs without a container. ``error`` is ``FetchError`` (``unsafe_url``) for image URLs, ``ValueError`` for
    options."""

    def fail(message: str) -> Exception:
        return FetchError("unsafe_url", message) if error is FetchError else error(message)

    scheme, sep, rest = url.strip().partition("://")
    family = OBJECT_STORE_SCHEMES.get(scheme.lower())
    if not sep or family is None:
        allowed = ", ".join(f"{s}://" for s in OBJECT_STORE_SCHEMES)
        raise fail(f"{what} {url!r} is not an object-store URL ({allowed})")
    if "::" in url:
        raise fail(f"{what} {url!r}: chained fsspec URLs are not allowed")
    segments = rest.split("/")
    if family == "memory":
        segments = [s for s in segments if s] if rest.startswith("/") else segments  # memory:///a/b is memory://a/b
    if any(unquote(seg) in (".", "..") for seg in segments):
        raise fail(f"{what} {url!r} has '.' or '..' path segments")
    if family == "hf":  # hf://datasets/owner/name[@rev]/path, hf://owner/name[@rev]/path (a model)
        size = 3 if segments and segments[0] in _HF_REPO_KINDS else 2
        repo = segments[:size]
        if len(repo) < size or not all(repo):
            raise fail(f"{what} {url!r} names no Hugging Face repo (hf://datasets/owner/name/...)")
        repo[-1] = repo[-1].split("@", 1)[0]
        return ObjectLocation(family, "/".join(repo), "/".join(segments[size:]))
    if not segments or not segments[0]:
        raise fail(f"{what} {url!r} names no bucket")
    return ObjectLocation(family, segments[0], "/".join(segments[1:]))


def check_object_url(url: str, base_uri: str | None, policy: FetchPolicy) -> ObjectLocation:
    """Refuse (``unsafe_url``) an object-store image URL outside the manifest's own bucket and every allowed prefix.

    The manifest's bucket is the container of ``base_uri`` when the manifest itself is in an object store (relative
    image paths always resolve inside it). A manifest on local disk or served over http(s) has no bucket of its
    own: every object-store image URL it names needs one of ``policy.allowed_prefixes`` (``--allow-prefix``).
    Without this an ``s3://`` line in a manifest would read any object the job's credentials reach.
    """
    location = object_location(url)
    for prefix in policy.allowed_prefixes:
        if location.within(object_location(prefix, what="--allow-prefix", error=ValueError)):
            return location
    own = None
    if base_uri and urlsplit(base_uri).scheme.lower() in OBJECT_STORE_SCHEMES:
        own = object_location(base_uri, what="manifest location")
        if (location.family, location.container) == (own.family, own.container):
            return location
    hint = f"pass --allow-prefix {location.root} (or a narrower prefix) to allow it"
    if own is None:
        raise FetchError("unsafe_url", f"{url} is in an object store but the manifest is not; {hint}")
    raise FetchError("unsafe_url", f"{url} is outside the manifest's bucket {own.root}; {hint}")


def join_relative(base_uri: str, rel: str) -> str:
    """``rel`` (a relative path from a manifest) under the remote folder ``base_uri``; refused if it climbs out."""
    norm = posixpath.normpath(rel.replace("\\", "/"))
    if norm.startswith("/") or norm == ".." or norm.startswith("../"):
        raise FetchError("unsafe_url", f"{rel} is outside the manifest's folder {base_uri}")
    return base_uri.rstrip("/") + "/" + norm
