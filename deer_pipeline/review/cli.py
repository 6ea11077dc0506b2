"""``deer-pipeline review``: the review web app, and decisions as CSV.

  deer-pipeline review [--host 127.0.0.1] [--port 8765] [--reviewer NAME] [--margin 0.10]
  deer-pipeline review export decisions.csv
  deer-pipeline review apply decisions.csv [--reviewer NAME] [--no-apply]

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
    if argv and argv[0] == "serve":
        argv = argv[1:]
    return serve(argv)
