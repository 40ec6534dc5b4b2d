"""The labeling web app: the page, its JSON API over a `LabelStore`, and `serve`.

Split from the store so the store (and `label export`) works without the web stack: fastapi,
uvicorn and pydantic come with `pip install 'preftune[label]'`.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import secrets
import socket
import sqlite3
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from preftune.errors import PreftuneError, require

require("label", "fastapi", "uvicorn", "pydantic", what="the labeling server")

from pydantic import BaseModel, ConfigDict, Field, field_validator  # noqa: E402
from preftune.label.store import (
    MAX_COMMENT_LENGTH,
    MAX_NAME_LENGTH,
    Conflict,
    InvalidAnswer,
    LabelStore,
    UnknownItem,
    load_items,
)

__all__ = ["PAGE_DIR", "create_app", "serve", "new_token"]

log = logging.getLogger("preftune")


PAGE_DIR = resources.files("preftune.label") / "page"
_STATIC = {"app.js": "text/javascript", "admin.js": "text/javascript", "style.css": "text/css"}
# The page loads only its own script and style: injected markup could not run even if it got in.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def _clean_name(value: str) -> str:
    name = " ".join(value.split())
    if not name:
        raise ValueError("the annotator name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise ValueError(f"the annotator name is longer than {MAX_NAME_LENGTH} characters")
    if not name.isprintable():
        raise ValueError("the annotator name holds control characters")
    return name


class AnnotatorBody(BaseModel):
    """A request that names its annotator; unknown fields are refused, not ignored."""

    model_config = ConfigDict(extra="forbid")
    annotator: str

    @field_validator("annotator")
    @classmethod
    def _name(cls, value: str) -> str:
        return _clean_name(value)


class JudgementBody(AnnotatorBody):
    item_id: str
    choice: Literal["A", "B", "tie", "skip"]
    strength: Literal[0, 1, 2] | None = None  # with --scale 5: 1 slightly, 2 much better
    comment: str | None = Field(default=None, max_length=MAX_COMMENT_LENGTH)


class AdminQuery(BaseModel):
    """What the dashboard asks: the export's settings, as `label export` takes them."""

    model_config = ConfigDict(extra="forbid")
    min_annotators: int | None = Field(default=None, ge=1)  # default: the session's annotators per item
    min_strength: float | None = Field(default=None, ge=0, le=2)


class AdminDownload(AdminQuery):
    format: Literal["jsonl", "csv", "report"] = "jsonl"


ADMIN_TOKEN_HEADER = "X-Admin-Token"


def _token_matches(given: str | None, expected: str) -> bool:
    return bool(given) and secrets.compare_digest(given.encode(), expected.encode())


def create_app(
    store: LabelStore,
    token: str | None = None,
    *,
    guidelines: str | None = None,
    admin_token: str | None = None,
):
    """The FastAPI app: the page at `/`, the lead's dashboard at `/admin`, their files under
    `/static/`, and a small JSON API.

    API (described for users in `preftune.label.http_api.HTTP_API`, which `label serve --help`
    prints; all POST, JSON bodies, `X-Label-Token` header when a token is set): `api/session` gives
    `{scale, guidelines}` (the guidelines as HTML, or null); `api/next` `{annotator}` gives
    `{item: {id, prompt, a, b, html} | null, progress}`; `api/judgements` `{annotator, item_id,
    choice, strength?, comment?}` with choice A (left), B (right), tie or skip and, with scale 5,
    strength 1 (slightly) or 2 (much) for A and B; `api/undo` `{annotator}`; `api/progress`
    `{annotator}`. The dashboard's `api/admin/summary` and `api/admin/download` take the
    `X-Admin-Token` header, and without an `admin_token` they are off. Errors are 4xx with a
    one-line `detail`.
    """
    from fastapi import Depends, FastAPI, Header, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response

    from preftune.label.rendering import render_markdown

    guidelines_html = render_markdown(guidelines) if guidelines and guidelines.strip() else None

    def check_token(x_label_token: str | None = Header(default=None)) -> None:
        if token and not _token_matches(x_label_token, token):
            raise HTTPException(401, "missing or wrong access token: open the link with ?token=... that you were given")

    def check_admin(x_admin_token: str | None = Header(default=None)) -> None:
        if not admin_token:
            raise HTTPException(403, "the dashboard is off: serve with --admin-token to turn it on")
        if not _token_matches(x_admin_token, admin_token):
            raise HTTPException(401, "missing or wrong dashboard token: open /admin?token=... with the dashboard's own token")

    app = FastAPI(title="preftune labeling", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def _headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for error in exc.errors():
            where = ".".join(str(p) for p in error.get("loc", ()) if p != "body")
            if error.get("type") == "json_invalid":
                problems.append("the request body is not valid JSON")
            elif not where:  # the body as a whole: missing, or not an object
                problems.append("the request body must be a JSON object (Content-Type: application/json)")
            else:
                message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
                problems.append(f"field '{where}': {message}" if where else message)
        return JSONResponse({"detail": "; ".join(problems) or "invalid request"}, status_code=422)

    @app.exception_handler(sqlite3.OperationalError)
    async def _busy(request: Request, exc: sqlite3.OperationalError) -> JSONResponse:
        return JSONResponse({"detail": f"the database is busy ({exc}): try again"}, status_code=503)

    def page_file(name: str, media_type: str) -> Response:
        return Response((PAGE_DIR / name).read_bytes(), media_type=media_type)

    @app.get("/", include_in_schema=False)
    def index() -> Response:
        return page_file("index.html", "text/html; charset=utf-8")

    @app.get("/admin", include_in_schema=False)
    def admin_page() -> Response:
        return page_file("admin.html", "text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> Response:
        if name not in _STATIC:
            raise HTTPException(404, f"no file '{name}'")
        return page_file(name, _STATIC[name] + "; charset=utf-8")

    api = [Depends(check_token)]

    @app.post("/api/session", dependencies=api)
    def session() -> dict:
        return {"scale": store.scale, "guidelines": guidelines_html}

    @app.post("/api/next", dependencies=api)
    def next_item(body: AnnotatorBody) -> dict:
        item = store.next_item(body.annotator)
        return {"item": item, "progress": store.progress(body.annotator)}

    @app.post("/api/judgements", dependencies=api)
    def judge(body: JudgementBody) -> dict:
        try:
            row = store.judge(body.annotator, body.item_id, body.choice, body.strength, body.comment)
        except UnknownItem as exc:
            raise HTTPException(404, str(exc)) from None
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None
        except InvalidAnswer as exc:
            raise HTTPException(422, str(exc)) from None
        return {"stored": row, "progress": store.progress(body.annotator)}

    @app.post("/api/undo", dependencies=api)
    def undo(body: AnnotatorBody) -> dict:
        try:
            undone = store.undo(body.annotator)
        except Conflict as exc:
            raise HTTPException(409, str(exc)) from None
        answer: dict[str, Any] = {"undone": undone, "progress": store.progress(body.annotator)}
        if not undone["returned"]:
            answer["detail"] = (
                f"your skip is withdrawn, but item '{undone['item_id']}' has meanwhile gone to its "
                f"{store.annotators_per_item} annotator(s), so it does not come back"
            )
        return answer

    @app.post("/api/progress", dependencies=api)
    def progress(body: AnnotatorBody) -> dict:
        return {"progress": store.progress(body.annotator)}

    admin = [Depends(check_admin)]

    def export(query: AdminQuery) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        from preftune.label.agreement import build_export

        try:
            return build_export(store, query.min_annotators or store.annotators_per_item, query.min_strength)
        except PreftuneError as exc:
            raise HTTPException(422, str(exc)) from None

    @app.post("/api/admin/summary", dependencies=admin)
    def admin_summary(body: AdminQuery) -> dict:
        report, _ = export(body)
        return {"report": report, "overview": store.overview()}

    @app.post("/api/admin/download", dependencies=admin)
    def admin_download(body: AdminDownload) -> Response:
        from preftune.label.agreement import pairs_csv, pairs_jsonl

        report, pairs = export(body)
        if body.format == "report":
            data, media, name = json.dumps(report, indent=2) + "\n", "application/json", "labelled.agreement.json"
        elif body.format == "csv":
            data, media, name = pairs_csv(pairs), "text/csv", "labelled.csv"
        else:
            data, media, name = pairs_jsonl(pairs), "application/jsonl", "labelled.jsonl"
        return Response(
            data.encode("utf-8"),
            media_type=media + "; charset=utf-8",
            headers={"Content-Disposition": f'attachment; filename="{name}"'},
        )

    return app


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_port_free(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise PreftuneError(f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port") from None


def read_guidelines(path: str | Path) -> str:
    """The guidelines file's Markdown text; a missing or unreadable file is a one-line error."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PreftuneError(f"--guidelines: file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise PreftuneError(f"--guidelines: {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise PreftuneError(f"--guidelines: cannot read {path} ({exc.strerror or exc})") from None


def serve(
    input_path: str | Path,
    db_path: str | Path,
    annotators_per_item: int = 3,
    host: str = "127.0.0.1",
    port: int = 8000,
    token: str | None = None,
    *,
    scale: int = 3,
    guidelines: str | Path | None = None,
    admin_token: str | None = None,
) -> None:
    """Add the input's items to the database and serve the labeling page until interrupted.

    The input file is only read. Binding anything but a loopback address without a token is
    allowed (a trusted network) but warned about. The dashboard always needs its own token: one
    is made when none is given, so annotators' links never open it.
    """
    import uvicorn

    if not 0 < port < 65536:
        raise PreftuneError(f"--port must be between 1 and 65535, got {port}")
    guidelines_text = read_guidelines(guidelines) if guidelines else None
    items = load_items(input_path)
    store = LabelStore(db_path, annotators_per_item=annotators_per_item, scale=scale)
    added = store.add_items(items)
    total = len(store.items())
    _check_port_free(host, port)
    if not _is_loopback(host) and not token:
        log.warning("listening on %s without --token: anyone who reaches this address can label", host)
    admin_token = admin_token or new_token()
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{port}/" + (f"?token={token}" if token else "")
    log.info(
        "%d items from %s (%d new), %d in %s, %d annotators per item",
        len(items), Path(input_path).name, added, total, db_path, annotators_per_item,
    )
    log.info("annotators open %s (Ctrl+C stops; nothing is lost)", url)
    log.info("the lead's dashboard: http://%s:%d/admin?token=%s (keep this link to yourself)", shown_host, port, admin_token)
    app = create_app(store, token, guidelines=guidelines_text, admin_token=admin_token)
    uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()


def new_token() -> str:
    """An access token for `label serve --token` without a value."""
    return secrets.token_urlsafe(16)
