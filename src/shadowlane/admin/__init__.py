"""Admin HTTP server: /metrics, /healthz, the JSON API, runtime control and the dashboard.

The public surface is re-exported here; `app` (routes, auth, built-ins), `router` (path
patterns), `server` (h11 framing and I/O) and `messages` (request/response types) are the parts.
"""

from shadowlane.admin.app import AdminApp
from shadowlane.admin.messages import (
    AdminRequest,
    AdminResponse,
    Handler,
    error_response,
    json_response,
    text_response,
)

__all__ = [
    "AdminApp",
    "AdminRequest",
    "AdminResponse",
    "Handler",
    "error_response",
    "json_response",
    "text_response",
]
