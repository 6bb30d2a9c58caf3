"""Inert httptools parsers, held by connections once they are closed.

An httptools parser looks up its protocol's callbacks once, when it is made, and keeps them:
bound methods of the connection that keeps the parser. Every HTTP/1.1 connection is therefore a
cycle (with its transport, socket and context, about 45 objects) that reference counting never
frees and only a collection of the old generation does. After a burst of 1,000 clients those
collections found 80,000-160,000 such objects and took 80-170 ms on the loop, in the middle of
the next burst's requests. A closed connection swaps its parser for one of these, which has no
callbacks, and the cycle is gone.
"""

from __future__ import annotations

from typing import Final

import httptools

__all__ = ["INERT_REQUEST_PARSER", "INERT_RESPONSE_PARSER"]


class _NoCallbacks:
    """A protocol in which a parser finds no callbacks to keep."""


#: for the server's connections (wire/server.py)
INERT_REQUEST_PARSER: Final = httptools.HttpRequestParser(_NoCallbacks())
#: for the upstream pool's connections (wire/upstream.py)
INERT_RESPONSE_PARSER: Final = httptools.HttpResponseParser(_NoCallbacks())
