"""Service references to endpoint URLs: a `--services` map first, then Kubernetes DNS.

Peers name a Kubernetes Service (`myservice.default`, `{name: petstore, namespace: x}`,
`reviews.prod.svc.cluster.local`), an upstream or a cluster; shadowlane needs URLs. A lookup in
the map tries the most specific key first (`name.namespace:port`, `name.namespace`,
`name:port`, `name`), as DESIGN.md section 4 says, so one map line can cover every port of a
service. Without a match the reference becomes `http://name.namespace.svc.cluster.local:port`,
which is what the name means inside a cluster (the fully qualified form, so no resolver search
list is involved).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import yaml

_CLUSTER_SUFFIXES = (".svc.cluster.local", ".svc")


class ServicesError(Exception):
    """The `--services` file cannot be used; the message names the file and the key."""


@dataclass(frozen=True)
class Resolved:
    """Where a reference went, and how (the output's comment says it)."""

    endpoints: list[str]
    how: str


@dataclass
class ServiceMap:
    """`--services FILE`: service name as the peer writes it -> endpoint URLs."""

    entries: dict[str, list[str]] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def load(cls, path: str | None) -> ServiceMap:
        if path is None:
            return cls()
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise ServicesError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except yaml.YAMLError as exc:
            raise ServicesError(f"{path}: invalid YAML: {exc}") from None
        if data is None:
            return cls(source=path)
        if not isinstance(data, dict):
            raise ServicesError(f"{path}: must be a mapping of service name to endpoint URLs")
        entries: dict[str, list[str]] = {}
        for key, value in data.items():
            urls = [value] if isinstance(value, str) else value
            if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
                raise ServicesError(f"{path}: {key}: must be a URL or a list of URLs")
            entries[str(key)] = list(urls)
        return cls(entries, path)

    def lookup(self, name: str, namespace: str | None, port: int | None) -> list[str] | None:
        keys = []
        if namespace:
            if port is not None:
                keys.append(f"{name}.{namespace}:{port}")
            keys.append(f"{name}.{namespace}")
        if port is not None:
            keys.append(f"{name}:{port}")
        keys.append(name)
        for key in keys:
            found = self.entries.get(key)
            if found is not None:
                return found
        return None

    def service(
        self, name: str, namespace: str | None, port: int | None, scheme: str = "http"
    ) -> Resolved:
        """A Kubernetes-style reference: `name` may itself carry `.namespace` or the suffix."""
        name, namespace = split_service(name, namespace)
        found = self.lookup(name, namespace, port)
        if found is not None:
            return Resolved(found, f"--services {self.source}")
        ns = namespace or "default"
        url = (
            f"{scheme}://{name}.{ns}.svc.cluster.local:{port or (443 if scheme == 'https' else 80)}"
        )
        return Resolved([url], "Kubernetes DNS, no --services entry")

    def url(self, url: str) -> Resolved:
        """A literal URL (Skipper, Emissary with a scheme): the map may still redirect its host."""
        parts = urlsplit(url)
        host = parts.hostname or ""
        name, namespace = split_service(host, None)
        found = self.lookup(name, namespace, parts.port)
        if found is not None:
            return Resolved(found, f"--services {self.source}")
        return Resolved([f"{parts.scheme}://{parts.netloc}"], "as written")


def split_service(name: str, namespace: str | None) -> tuple[str, str | None]:
    """`reviews.prod.svc.cluster.local` -> (`reviews`, `prod`); `myservice.default` likewise."""
    for suffix in _CLUSTER_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    if "." in name:
        head, _, ns = name.partition(".")
        if ns and "." not in ns:
            return head, ns
    return name, namespace


def split_host_port(text: str) -> tuple[str, int | None]:
    """`name:8080` -> (`name`, 8080); a scheme is not expected here."""
    host, sep, port = text.rpartition(":")
    if sep and port.isdigit() and host:
        return host, int(port)
    return text, None
