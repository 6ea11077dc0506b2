"""The review web app (Starlette): roster, deer pages, the review queue and corrections.

Safety:

* bound to 127.0.0.1 by default; then only requests whose Host is a loopback name are served
  (a DNS-rebinding page cannot read it). Any other ``--host`` needs a token (environment
  variable ``settings.REVIEW_TOKEN_ENV``): every request must carry it (``Authorization: Bearer``,
  or ``?token=`` once, which sets an HttpOnly cookie);
* state changes are POSTs only, each with a CSRF token (an HMAC of a per-browser cookie with a
  per-process secret) and, when the browser sends one, an Origin matching the host;
* crops are served by detection id from the crop store only: the stored path must resolve inside
  the store root (no path traversal).

Every decision is appended to ``identity_reviews`` (its own transaction, so concurrent reviewers
never lose one another's decisions) and then applied by a replay under the identity lock.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from urllib.parse import parse_qs, urlencode, urlparse

import sqlalchemy as sa
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, PlainTextResponse, RedirectResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from deer_pipeline import settings as deer_settings
from deer_pipeline.identity import lookup as lookup_lib
from deer_pipeline.identity import reviews
from deer_pipeline.review import pages, queue as review_queue

log = logging.getLogger(__name__)

TEMPLATES = Path(__file__).resolve().parent / "templates"
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")
CSRF_COOKIE = "deer_csrf"
TOKEN_COOKIE = "deer_review_token"
REVIEWER_COOKIE = "deer_reviewer"
QUEUE_ACTIONS = ("same", "different", "new", "unidentifiable", "skip", "undo")


def is_loopback(host: str) -> bool:
    return host in LOOPBACK_HOSTS or host.startswith("127.")


@dataclass
class ReviewConfig:
    engine: Engine
    crop_store: Path
    reviewer: str
    token: str | None = None
    host: str = deer_settings.REVIEW_HOST
    margin: float = deer_settings.REVIEW_MARGIN
    apply: bool = True           # replay after each decision (False: recorded only)


class ReviewAppError(RuntimeError):
    """The app cannot start as configured (e.g. a public host without a token)."""


def create_app(config: ReviewConfig) -> Starlette:
    if not is_loopback(config.host) and not config.token:
        raise ReviewAppError(
            f"--host {config.host} is not loopback: set {deer_settings.REVIEW_TOKEN_ENV} to a long random "
            "token first (every request must then carry it)")
    secret = secrets.token_bytes(32)
    templates = Jinja2Templates(directory=str(TEMPLATES))
    store_root = Path(config.crop_store).resolve()

    # -- helpers --------------------------------------------------------------------------------
    def csrf_for(request: Request) -> str:
        seed = request.state.csrf_seed
        return hmac.new(secret, seed.encode(), hashlib.sha256).hexdigest()

    def reviewer_of(request: Request, form: dict | None = None) -> str:
        who = ((form or {}).get("reviewer") or request.cookies.get(REVIEWER_COOKIE) or config.reviewer).strip()
        return who[:80] or config.reviewer

    def render(request: Request, name: str, ctx: dict, status: int = 200) -> Response:
        ctx = {"csrf": csrf_for(request), "reviewer": reviewer_of(request),
               "flash": request.query_params.get("msg"), **ctx}
        return templates.TemplateResponse(request, name, ctx, status_code=status)

    async def form_of(request: Request) -> dict:
        ctype = request.headers.get("content-type", "").split(";")[0].strip()
        body = await request.body()
        if ctype != "application/x-www-form-urlencoded":
            return {}
        parsed = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        return {k: (v if k.endswith("[]") else v[-1]) for k, v in parsed.items()}

    def back(path: str, msg: str | None = None) -> RedirectResponse:
        return RedirectResponse(path + (("?" + urlencode({"msg": msg})) if msg else ""), status_code=303)

    def replay(detection_ids) -> None:
        """Apply at once; the decision is recorded already, so a failure here loses nothing (the
        next materialisation applies it) but is said plainly."""
        try:
            reviews.apply(config.engine, detection_ids)
        except Exception as exc:
            log.exception("replay after a review decision failed")
            raise reviews.ReviewError(f"recorded, but deciding again failed ({exc}); the decision "
                                      "takes effect at the next materialisation") from exc

    def decide(kind: str, a, b=(), *, who: str, **kw) -> int:
        with config.engine.begin() as conn:
            rid = reviews.record(conn, kind, a, b, reviewer=who, source="web", **kw)
        if config.apply and kind not in ("skip", "name"):           # a name changes no decision
            replay(list(a) + list(b))
        return rid

    def undo(review_id: int, who: str):
        with config.engine.begin() as conn:
            undone = reviews.undo(conn, review_id, reviewer=who, source="web")
        if config.apply and undone.kind not in ("skip", "name"):
            replay(list(undone.a) + list(undone.b))
        return undone

    # -- pages ----------------------------------------------------------------------------------
    async def home(request: Request):
        return RedirectResponse("/queue", status_code=303)

    async def queue_page(request: Request):
        margin = _float(request.query_params.get("margin"), config.margin)

        def load():
            with config.engine.connect() as conn:
                return review_queue.build_queue(conn, margin, limit=12)

        q = await run_in_threadpool(load)
        return render(request, "queue.html", {"queue": q, "item": q.items[0] if q.items else None,
                                              "upcoming": q.items[1:], "margin": margin})

    async def roster_page(request: Request):
        qp = request.query_params
        sort = qp.get("sort", "last_seen")
        desc = qp.get("dir", "desc") != "asc"
        camera = qp.get("camera") or None
        day_from, day_to = _day(qp.get("from")), _day(qp.get("to"))

        def load():
            with config.engine.connect() as conn:
                return pages.roster(conn, sort, desc, camera, day_from, day_to), pages.cameras(conn)

        rows, cams = await run_in_threadpool(load)
        return render(request, "roster.html", {"rows": rows, "cameras": cams, "sort": sort, "desc": desc,
                                               "camera": camera or "", "day_from": qp.get("from") or "",
                                               "day_to": qp.get("to") or ""})

    async def deer_detail(request: Request):
        deer_id = request.path_params["deer_id"]

        def load():
            with config.engine.connect() as conn:
                return pages.deer_page(conn, deer_id)

        page = await run_in_threadpool(load)
        if page is None:
            return render(request, "missing.html", {"what": f"deer #{deer_id}"}, status=404)
        return render(request, "deer.html", {"deer": page})

    async def weekly_png(request: Request):
        deer_id = request.path_params["deer_id"]

        def load():
            with config.engine.connect() as conn:
                return pages.weekly_plot_png(pages.weekly_counts(conn, deer_id),
                                             f"deer #{deer_id}: sightings per week and camera")

        return Response(await run_in_threadpool(load), media_type="image/png",
                        headers={"Cache-Control": "no-store"})

    async def crop(request: Request):
        detection_id = request.path_params["detection_id"]

        def find():
            with config.engine.connect() as conn:
                return conn.execute(sa.text("SELECT crop_path FROM crops WHERE detection_id = :d "
                                            "AND status = 'ok'"), {"d": detection_id}).scalar()

        rel = await run_in_threadpool(find)
        path = safe_crop_path(store_root, rel)
        if path is None:
            return PlainTextResponse("no such crop", status_code=404)
        return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    async def reviews_page(request: Request):
        def load():
            with config.engine.connect() as conn:
                return reviews.all_reviews(conn)[::-1][:200]

        return render(request, "reviews.html", {"reviews": await run_in_threadpool(load)})

    # -- state changes (POST, CSRF-checked by the middleware) -----------------------------------
    async def answer(request: Request):
        form = await form_of(request)
        who = reviewer_of(request, form)
        action, key = form.get("action", ""), form.get("item_key", "")
        if action not in QUEUE_ACTIONS:
            return PlainTextResponse(f"unknown action {action!r}", status_code=400)

        def work() -> str:
            if action == "undo":
                with config.engine.connect() as conn:
                    last = reviews.last_undoable(conn, who)
                if last is None:
                    return f"nothing of {who} to undo"
                undone = undo(last, who)
                return f"undid decision {last} ({undone.kind})"
            with config.engine.connect() as conn:
                item = review_queue.load_item(conn, key)
            if item is None:
                return "that item is gone (decided again meanwhile); here is the next one"
            cand = None
            if item.candidates:
                wanted = _int(form.get("candidate"))
                cand = next((c for c in item.candidates if c.deer_id == wanted), item.candidates[0])
            note = form.get("note") or None
            if item.kind == "merge":
                b_all = _members(config.engine, cand.deer_id)
                if action == "same":
                    rid = decide("merge", item.query_ids, b_all, who=who, deer_a=item.query_deer,
                                    deer_b=cand.deer_id, item_key=key, score=item.score, note=note)
                elif action in ("different", "new"):
                    rid = decide("different", item.query_ids, b_all, who=who, deer_a=item.query_deer,
                                    deer_b=cand.deer_id, item_key=key, score=item.score, note=note)
                elif action == "skip":
                    rid = decide("skip", item.query_ids, who=who, item_key=key, note=note)
                else:
                    return "a merge candidate cannot be marked unidentifiable; open the deer page"
                return f"recorded decision {rid}: {action}"
            shown = [s.detection_id for s in cand.sightings] if cand else []
            common = dict(who=who, deer_a=item.query_deer, item_key=key, score=item.score, note=note)
            if action == "same":
                rid = decide("same", item.query_ids, shown, deer_b=cand.deer_id, **common)
            elif action == "different":
                rid = decide("different", item.query_ids, shown, deer_b=cand.deer_id, **common)
            elif action == "new":
                all_shown = [s.detection_id for c in item.candidates for s in c.sightings]
                rid = decide("new", item.query_ids, all_shown, **common)
            elif action == "unidentifiable":
                rid = decide("unidentifiable", item.query_ids, **common)
            else:
                rid = decide("skip", item.query_ids, **common)
            return f"recorded decision {rid}: {action}"

        try:
            msg = await run_in_threadpool(work)
        except reviews.ReviewError as exc:
            msg = f"not recorded: {exc}"
        return back("/queue", msg)

    async def name_deer(request: Request):
        form = await form_of(request)
        deer_id = request.path_params["deer_id"]
        who = reviewer_of(request, form)

        def work():
            ids = _members(config.engine, deer_id)
            if not ids:
                raise reviews.ReviewError(f"deer #{deer_id} has no sightings")
            decide("name", ids, who=who, name=form.get("name", ""), deer_a=deer_id, note=form.get("note") or None)
            return f"deer #{deer_id} is now called {form.get('name', '').strip()}"

        return await _run(work, f"/deer/{deer_id}")

    async def merge_deer(request: Request):
        form = await form_of(request)
        deer_id = request.path_params["deer_id"]
        other = _int(form.get("other"))
        who = reviewer_of(request, form)

        def work():
            if other is None or other == deer_id:
                raise reviews.ReviewError("give the number of another deer to merge with")
            a, b = _members(config.engine, deer_id), _members(config.engine, other)
            if not b:
                raise reviews.ReviewError(f"deer #{other} does not exist")
            rid = decide("merge", a, b, who=who, deer_a=deer_id, deer_b=other, note=form.get("note") or None)
            return f"merged deer #{deer_id} and #{other} (decision {rid})"

        target = await _run(work, f"/deer/{deer_id}")
        return target

    async def split_deer(request: Request):
        form = await form_of(request)
        deer_id = request.path_params["deer_id"]
        who = reviewer_of(request, form)
        chosen = form.get("sighting[]") or []

        def work():
            ids = _members(config.engine, deer_id)
            a = [d for d in chosen if d in ids]
            rest = [d for d in ids if d not in a]
            if not a or not rest:
                raise reviews.ReviewError("choose some, but not all, of the deer's sightings to split off")
            rid = decide("split", a, rest, who=who, deer_a=deer_id, note=form.get("note") or None)
            return f"split {len(a)} sighting(s) off deer #{deer_id} (decision {rid})"

        return await _run(work, f"/deer/{deer_id}")

    async def unidentifiable(request: Request):
        form = await form_of(request)
        det = request.path_params["detection_id"]
        who = reviewer_of(request, form)
        back_to = form.get("back") or "/deer"
        if not back_to.startswith("/") or back_to.startswith("//"):
            back_to = "/deer"

        def work():
            rid = decide("unidentifiable", [det], who=who, note=form.get("note") or None)
            return f"sighting {det} is unidentifiable and left out of matching (decision {rid})"

        return await _run(work, back_to)

    async def sighting_page(request: Request):
        """Which deer is this photo? The known deer most like one sighting (``identity.lookup``:
        the HNSW index, then the ensemble's exact score), each with its closest sighting and a
        button that records "same animal" (and replays it)."""
        det = request.path_params["detection_id"]

        def load():
            with config.engine.connect() as conn:
                return lookup_lib.look_alikes(conn, det, deer_settings.configured_ensemble_weights(),
                                              k=deer_settings.LOOKUP_DEER)

        try:
            found = await run_in_threadpool(load)
        except lookup_lib.UnknownDetection as exc:
            return render(request, "missing.html", {"what": str(exc)}, status=404)
        except lookup_lib.store.MatchingError as exc:       # no vector (or no version) yet
            return PlainTextResponse(f"cannot look this photo up: {exc}", status_code=409)
        return render(request, "sighting.html", {"found": found})

    async def same_as(request: Request):
        form = await form_of(request)
        det = request.path_params["detection_id"]
        who = reviewer_of(request, form)
        other, deer_b = form.get("other") or "", _int(form.get("deer"))

        def work():
            if not other or other == det:
                return "choose a sighting of another deer"
            with config.engine.connect() as conn:
                deer_a = conn.execute(sa.text("SELECT deer_id FROM sightings WHERE detection_id = :d"),
                                      {"d": det}).scalar()
            rid = decide("same", [det], [other], who=who, deer_a=deer_a, deer_b=deer_b,
                         note=form.get("note") or None)
            return f"recorded decision {rid}: {det} is the same animal as {other} (deer #{deer_b})"

        return await _run(work, f"/sighting/{det}")

    async def undo_review(request: Request):
        form = await form_of(request)
        who = reviewer_of(request, form)
        review_id = request.path_params["review_id"]

        def work():
            undone = undo(review_id, who)
            return f"undid decision {review_id} ({undone.kind})"

        return await _run(work, "/reviews")

    async def set_reviewer(request: Request):
        form = await form_of(request)
        who = (form.get("reviewer") or "").strip()[:80]
        resp = back(form.get("back") if (form.get("back") or "").startswith("/") and
                    not form.get("back", "").startswith("//") else "/queue")
        if who:
            resp.set_cookie(REVIEWER_COOKIE, who, httponly=True, samesite="strict", max_age=3600 * 24 * 365)
        return resp

    async def _run(work, path: str):
        try:
            msg = await run_in_threadpool(work)
        except reviews.ReviewError as exc:
            msg = f"not recorded: {exc}"
        return back(path, msg)

    routes = [
        Route("/", home),
        Route("/queue", queue_page),
        Route("/queue/answer", answer, methods=["POST"]),
        Route("/deer", roster_page),
        Route("/deer/{deer_id:int}", deer_detail),
        Route("/deer/{deer_id:int}/weekly.png", weekly_png),
        Route("/deer/{deer_id:int}/name", name_deer, methods=["POST"]),
        Route("/deer/{deer_id:int}/merge", merge_deer, methods=["POST"]),
        Route("/deer/{deer_id:int}/split", split_deer, methods=["POST"]),
        Route("/sighting/{detection_id}", sighting_page),
        Route("/sighting/{detection_id}/same", same_as, methods=["POST"]),
        Route("/sighting/{detection_id}/unidentifiable", unidentifiable, methods=["POST"]),
        Route("/reviews", reviews_page),
        Route("/reviews/{review_id:int}/undo", undo_review, methods=["POST"]),
        Route("/reviewer", set_reviewer, methods=["POST"]),
        Route("/crop/{detection_id}", crop),
    ]
    guard = _Guard(config, secret)
    return Starlette(routes=routes, middleware=[Middleware(BaseHTTPMiddleware, dispatch=guard)])


class _Guard:
    """Host check (loopback binding), token, CSRF cookie and check on every POST."""

    def __init__(self, config: ReviewConfig, secret: bytes):
        self.config = config
        self.secret = secret
        self.loopback = is_loopback(config.host)

    def _csrf_ok(self, request: Request, supplied: str | None) -> bool:
        seed = request.cookies.get(CSRF_COOKIE)
        if not seed or not supplied:
            return False
        want = hmac.new(self.secret, seed.encode(), hashlib.sha256).hexdigest()
        return hmac.compare_digest(want, supplied)

    async def __call__(self, request: Request, call_next):
        host = urlparse("//" + (request.headers.get("host") or "")).hostname or ""
        if self.loopback and not is_loopback(host):
            return PlainTextResponse("this review app answers on 127.0.0.1 only", status_code=421)
        set_token_cookie = False
        if self.config.token:
            supplied = None
            auth = request.headers.get("authorization", "")
            if auth.lower().startswith("bearer "):
                supplied = auth[7:].strip()
            elif request.query_params.get("token"):
                supplied = request.query_params["token"]
                set_token_cookie = True
            else:
                supplied = request.cookies.get(TOKEN_COOKIE)
            if not supplied or not hmac.compare_digest(supplied.encode(), self.config.token.encode()):
                return PlainTextResponse(f"a token is required ({deer_settings.REVIEW_TOKEN_ENV})",
                                         status_code=401)
        seed = request.cookies.get(CSRF_COOKIE)
        new_seed = None
        if not seed:
            new_seed = seed = secrets.token_urlsafe(24)
        request.state.csrf_seed = seed
        if request.method not in ("GET", "HEAD"):
            if request.method != "POST":
                return PlainTextResponse("method not allowed", status_code=405)
            origin = request.headers.get("origin")
            if origin and origin != "null" and urlparse(origin).netloc != request.headers.get("host"):
                return PlainTextResponse("cross-origin request refused", status_code=403)
            if origin == "null":
                return PlainTextResponse("cross-origin request refused", status_code=403)
            supplied = request.headers.get("x-csrf-token")
            if supplied is None and request.headers.get("content-type", "").startswith(
                    "application/x-www-form-urlencoded"):
                body = await request.body()
                supplied = (parse_qs(body.decode("utf-8", "replace")).get("csrf_token") or [None])[-1]
            if new_seed is not None or not self._csrf_ok(request, supplied):
                return PlainTextResponse("CSRF token missing or wrong: reload the page and try again",
                                         status_code=403)
        if set_token_cookie:
            clean = request.url.remove_query_params("token")
            response = RedirectResponse(str(clean.path) + (f"?{clean.query}" if clean.query else ""),
                                        status_code=303)
            response.set_cookie(TOKEN_COOKIE, self.config.token, httponly=True, samesite="strict")
        else:
            response = await call_next(request)
        if new_seed is not None:
            response.set_cookie(CSRF_COOKIE, new_seed, httponly=True, samesite="strict")
        response.headers.setdefault("X-Frame-Options", "DENY")
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "same-origin")
        return response


def safe_crop_path(store_root: Path, rel: str | None) -> Path | None:
    """The crop file for a stored relative path, only when it lies inside the store root."""
    if not rel:
        return None
    root = Path(store_root).resolve()
    try:
        path = (root / rel).resolve()
    except (OSError, ValueError):
        return None
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path


def _members(engine: Engine, deer_id: int) -> list[str]:
    with engine.connect() as conn:
        return conn.execute(sa.text("SELECT detection_id FROM sightings WHERE deer_id = :d "
                                    "ORDER BY captured_at, detection_id"), {"d": deer_id}).scalars().all()


def _int(v) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _float(v, default: float) -> float:
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


def _day(v) -> date | None:
    try:
        return date.fromisoformat(v) if v else None
    except ValueError:
        return None
