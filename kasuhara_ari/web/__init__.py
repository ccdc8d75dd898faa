"""``kasuhara web``: the browser console (login, sessions, and the pages built on them).

The face layer: it may use accounts, config, safe and events (later the evidence desk), never the CLI.
"""

from .app import create_app

__all__ = ["create_app"]
