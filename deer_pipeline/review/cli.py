"""``deer-pipeline review``: the review web app, and decisions as CSV.

  deer-pipeline review [--host 127.0.0.1] [--port 8765] [--reviewer NAME] [--margin 0.10]
  deer-pipeline review export decisions.csv
  deer-pipeline review apply decisions.csv [--reviewer NAME] [--no-apply]
  deer-pipeline review lookup DETECTION_ID [--k 10] [--ef-search 200]   (which deer is this photo?)

A host other than loopback needs a token in the environment variable named by
``settings.REVIEW_TOKEN_ENV`` (DEER_REVIEW_TOKEN); open ``http://HOST:PORT/?token=...`` once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from deer_pipeline import settings


def default_reviewer() -> str:
    import getpass

    try:
        user = getpass.getuser()
    except Exception:
        user = ""
    return settings.env(settings.REVIEWER_ENV) or user or "reviewer"


def serve(argv: list[str]) -> int:
    import uvicorn

    from deer_pipeline import db
    from deer_pipeline.review.app import ReviewAppError, ReviewConfig, create_app

    p = argparse.ArgumentParser(prog="deer-pipeline review", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--host", default=settings.REVIEW_HOST)
    p.add_argument("--port", type=int, default=settings.REVIEW_PORT)
    p.add_argument("--reviewer", default=None, help=f"name recorded with decisions (default ${settings.REVIEWER_ENV} or your user)")
    p.add_argument("--margin", type=float, default=settings.REVIEW_MARGIN,
                   help="queue: decisions whose score lies this close to the threshold")
    p.add_argument("--no-apply", action="store_true", help="record decisions only; they take effect at the next run")
    args = p.parse_args(argv)
    try:
        app = create_app(ReviewConfig(engine=db.get_engine(), crop_store=Path(settings.crop_store_dir()),
                                      reviewer=args.reviewer or default_reviewer(),
                                      token=settings.env(settings.REVIEW_TOKEN_ENV), host=args.host,
                                      margin=args.margin, apply=not args.no_apply))
    except ReviewAppError as exc:
        print(f"deer-pipeline review: {exc}", file=sys.stderr)
        return 2
    print(f"deer-pipeline review: http://{args.host}:{args.port}/queue", file=sys.stderr)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("export", "apply"):
        from deer_pipeline import db
        from deer_pipeline.identity import reviews

        p = argparse.ArgumentParser(prog=f"deer-pipeline review {argv[0]}")
        p.add_argument("csv", type=Path)
        if argv[0] == "apply":
            p.add_argument("--reviewer", default=None, help="for rows without one")
            p.add_argument("--no-apply", action="store_true", help="record only; no replay now")
        args = p.parse_args(argv[1:])
        engine = db.get_engine()
        if argv[0] == "export":
            with engine.connect() as conn:
                n = reviews.export_csv(conn, args.csv)
            print(f"wrote {n} decision(s) to {args.csv}")
            return 0
        try:
            with engine.begin() as conn:
                new, involved = reviews.import_csv(conn, args.csv, args.reviewer or default_reviewer())
        except (reviews.ReviewError, OSError) as exc:
            print(f"deer-pipeline review apply: {exc}", file=sys.stderr)
            return 2
        print(f"recorded {len(new)} new decision(s) from {args.csv}")
        if new and not args.no_apply:
            s = reviews.apply(engine, involved)
            if s is not None:
                print(f"replayed from {s.partition_key}: {s.decided + s.replayed} sighting(s) decided again, "
                      f"{s.deer_total} deer")
        return 0
    if argv and argv[0] == "lookup":
        return lookup(argv[1:])
    if argv and argv[0] == "serve":
        argv = argv[1:]
    return serve(argv)


def lookup(argv: list[str]) -> int:
    """Which deer is this photo? The known deer most like one sighting (HNSW index of the
    primary model, then the ensemble's exact score), best first."""
    from deer_pipeline import db
    from deer_pipeline.identity import lookup as lookup_lib
    from deer_pipeline.identity.store import MatchingError

    p = argparse.ArgumentParser(prog="deer-pipeline review lookup", description=lookup.__doc__)
    p.add_argument("detection_id")
    p.add_argument("--k", type=int, default=settings.LOOKUP_DEER, help="deer to list")
    p.add_argument("--ef-search", type=int, default=settings.HNSW_EF_SEARCH, help="HNSW hnsw.ef_search to start from")
    args = p.parse_args(argv)
    try:
        with db.get_engine().connect() as conn:
            found = lookup_lib.look_alikes(conn, args.detection_id, settings.configured_ensemble_weights(),
                                           k=args.k, ef_search=args.ef_search)
    except (MatchingError, ValueError) as exc:
        print(f"deer-pipeline review lookup: {exc}", file=sys.stderr)
        return 2
    how = (f"HNSW, ef_search {found.ef_search}" if found.found_by == "hnsw"
           else "exact scan (the index found too few deer)")
    print(f"{found.detection_id}: now deer {found.deer_id if found.deer_id is not None else '(not decided)'}"
          f", flank {found.side or 'unknown'}; {len(found.look_alikes)} deer by {how}")
    print("rank  deer  similarity  closest sighting")
    for i, a in enumerate(found.look_alikes, 1):
        mark = "  <- its deer now" if a.deer_id == found.deer_id else ""
        print(f"{i:>4}  {a.deer_id:>4}  {a.similarity:10.4f}  {a.detection_id}{mark}")
    return 0
