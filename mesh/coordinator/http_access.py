"""API keys on the OpenAI HTTP app: `Authorization: Bearer KEY` on every route but a few.

An ASGI middleware in front of the whole app (mesh/coordinator/openai_api.py): a request
without a valid key is answered 401 (OpenAI's error body, `WWW-Authenticate: Bearer`) before
any route reads it; a request with one runs with `CALLER` set, and so does everything the
route starts, its streaming body included (Starlette runs it in a task started inside the
call). The routes check scope and limits themselves (`AccessControl.admit`), once they know
the task's agent and model.

Open without a key: the Prometheus scrape (`/metrics`), `/v1/mesh/info` (the ingress
addresses: where to connect), and the dashboard's page and static files, which hold no data; the dashboard's data (`/dashboard/api/...`, `/dashboard/events`)
and every `/v1/...` route need one.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from mesh.coordinator.access import AccessControl
from mesh.coordinator.openai_api import error_response
from mesh.core.caller import CALLER
from mesh.core.errors import MeshError

# /v1/mesh/info: the addresses of the ingresses (where to connect, not what runs); the
# coordinator's own start (mesh/coordinator/runner.py) waits on it before any key exists.
OPEN_PATHS = frozenset(
    {
        "/metrics",
        "/dashboard",
        "/dashboard/",
        "/v1/mesh/info",
        "/dashboard/login",
        "/dashboard/logout",
    }
)
# The dashboard's browser cannot send a header with EventSource: after `POST /dashboard/login`
# its key rides in this cookie (HttpOnly, SameSite=Strict), taken for reads (GET) only, so a
# page elsewhere can neither read it nor spend it on a task.
KEY_COOKIE = "mesh_key"
OPEN_PREFIXES = ("/dashboard/static/",)


def is_open(path: str) -> bool:
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


class RequireApiKey:
    """The middleware: authenticate, then call the app with CALLER set."""

    def __init__(self, app: ASGIApp, access: AccessControl) -> None:
        self.app = app
        self.access = access

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        authorization = _header(scope, b"authorization")
        if authorization is None and scope.get("method") == "GET":
            cookie = _cookie(_header(scope, b"cookie"), KEY_COOKIE)
            if cookie:
                authorization = b"Bearer " + cookie.encode()
        try:
            caller = self.access.authenticate(authorization)
        except MeshError as error:
            await error_response(error)(scope, receive, send)
            return
        token = CALLER.set(caller)
        try:
            await self.app(scope, receive, send)
        finally:
            CALLER.reset(token)


def _cookie(header: bytes | None, name: str) -> str:
    """The value of cookie `name` in a Cookie header ("" if absent)."""
    if not header:
        return ""
    for part in header.decode("latin-1").split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return ""


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None
