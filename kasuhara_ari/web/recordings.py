"""Recordings in the console: the recording page, playback and the admin actions (being built)."""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from ..safe import is_safe_call_id
from .console import Console
from .sessions import Session


class RecordingPages:
    def __init__(self, console: Console) -> None:
        self.c = console

    async def download(self, request: Request) -> Response:
        """Placeholder until the evidence desk is wired: proves the role check is made on the server."""
        allowed = await self.c.require(request, "download")
        if not isinstance(allowed, Session):
            return allowed
        if not is_safe_call_id(request.path_params["call_id"]):
            raise HTTPException(404)
        return self.c.render(request, "message.html", 501, message_key="not_yet", csrf=allowed.csrf)


def routes(console: Console) -> list[BaseRoute]:
    pages = RecordingPages(console)
    return [Route("/recordings/{call_id}/download", pages.download, methods=["GET"])]
