"""shadowlane: an HTTP ingress that shadows live traffic to new backends and compares answers."""

__version__ = "0.1.0"
