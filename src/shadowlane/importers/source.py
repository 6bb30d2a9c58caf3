"""Where a running config comes from: `-c FILE|DIR`, maybe peers' documents, and `--services`.

`run` and `check` load through a `ConfigSource` so that a reload (SIGHUP, `--watch`, the admin
API) reads the same way the start did. A plain single-document config file goes straight to
`config.load_config`, keeping its exact error positions; anything else is translated first.

`fingerprint` is what `--watch` compares: for a file, what `stat` says after following
symlinks (a mounted ConfigMap swaps its `..data` link, so the inode changes even when the
modification time does not); for a directory, the same for each file it contributes, and the
list of names, so a file added or removed counts too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import yaml

from shadowlane.config import Config, ConfigError, load_config, parse_config
from shadowlane.importers.documents import files_of, is_native_only, translate_paths
from shadowlane.importers.model import Note
from shadowlane.importers.services import ServiceMap, ServicesError


@dataclass(frozen=True)
class ConfigSource:
    path: str
    services: str | None = None
    strict: bool = False

    def load_with_notes(self) -> tuple[Config, list[Note]]:
        """The config and the notes about what was not translated; ConfigError on problems
        (with `strict`, every note is one)."""
        if os.path.isfile(self.path) and not self.path.endswith(".eskip"):
            try:
                with open(self.path, encoding="utf-8") as f:
                    text = f.read()
            except (OSError, UnicodeDecodeError):
                text = ""
            if is_native_only(text):
                return load_config(self.path), []
        try:
            services = ServiceMap.load(self.services)
        except ServicesError as err:
            raise ConfigError([f"--services {err}"]) from None
        loaded = translate_paths([self.path], services)
        if self.strict and loaded.notes:
            raise ConfigError([f"{n} (--strict)" for n in loaded.notes])
        text = yaml.safe_dump(loaded.config, sort_keys=False)
        return parse_config(text, f"{self.path} (as translated)"), loaded.notes

    def load(self) -> Config:
        return self.load_with_notes()[0]

    def fingerprint(self) -> tuple[object, ...]:
        parts: list[object] = []
        paths = [self.path] + ([self.services] if self.services else [])
        for path in paths:
            try:
                files = files_of(path)
            except OSError:
                files = []
            parts.append(tuple(str(f) for f in files))
            for f in files:
                try:
                    st = os.stat(f)
                except OSError:
                    parts.append(None)
                    continue
                parts.append((st.st_ino, st.st_size, st.st_mtime_ns))
        return tuple(parts)
