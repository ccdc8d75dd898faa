"""The live board: the calls in progress (the page; the live feed follows)."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .console import Console


class BoardPages:
    def __init__(self, console: Console) -> None:
        self.c = console

    async def board(self, request: Request) -> Response:
        session = await self.c.session(request)
        if session is None:
            return self.c.to_login(request)
        return self.c.render(
            request,
            "board.html",
            account=session.account,
            role=session.role.value,
            csrf=session.csrf,
            here="/",
        )


def routes(console: Console) -> list[BaseRoute]:
    pages = BoardPages(console)
    return [Route("/", pages.board, methods=["GET"])]
