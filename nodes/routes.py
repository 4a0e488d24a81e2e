"""HTTP routes of the pack: ``GET /draft/status`` (latest training state per trainer node, so a
reloaded page can redraw its chart; see progress_events)."""
from __future__ import annotations

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    from aiohttp import web
    from server import PromptServer

    from .progress_events import latest_status

    @PromptServer.instance.routes.get("/draft/status")
    async def draft_status(request):
        return web.json_response(latest_status())

    _registered = True
