"""``deer-pipeline id``: corrections from the command line (for scripts).

  deer-pipeline id merge DEER_A DEER_B          the two deer are one animal
  deer-pipeline id split DEER DETECTION...      these sightings are another animal than the rest
  deer-pipeline id name DEER NAME               name the deer (the name follows its sightings)
  deer-pipeline id unidentifiable DETECTION...  leave these sightings out of matching
  deer-pipeline id undo REVIEW_ID               withdraw a decision
  deer-pipeline id list                         every decision

Options: --reviewer NAME (default $DEER_REVIEWER or your user), --note TEXT, --no-apply (record
only; the decision takes effect at the next materialisation instead of by a replay now).
"""

from __future__ import annotations

import argparse
import sys

import sqlalchemy as sa

ACTIONS = ("merge", "split", "name", "unidentifiable", "undo", "list")


def _members(conn, deer_id: int) -> list[str]:
    ids = conn.execute(sa.text("SELECT detection_id FROM sightings WHERE deer_id = :d "
                               "ORDER BY captured_at, detection_id"), {"d": deer_id}).scalars().all()
    if not ids:
        from deer_pipeline.identity.reviews import ReviewError

        raise ReviewError(f"deer {deer_id} does not exist (or has no sightings)")
    return ids


def run(engine, action: str, args: list[str], reviewer: str, note: str | None = None,
        apply: bool = True) -> str:
    """Record one correction (and replay); returns a line saying what was done."""
    from deer_pipeline.identity import reviews

    undone = None
    with engine.begin() as conn:
        if action == "merge":
            a, b = int(args[0]), int(args[1])
            rid = reviews.record(conn, "merge", _members(conn, a), _members(conn, b), reviewer=reviewer,
                                 deer_a=a, deer_b=b, note=note, source="cli")
            what, involved = f"merged deer {a} and {b}", _members(conn, a) + _members(conn, b)
        elif action == "split":
            deer, chosen = int(args[0]), list(args[1:])
            ids = _members(conn, deer)
            stray = [c for c in chosen if c not in ids]
            if stray:
                raise reviews.ReviewError(f"not sightings of deer {deer}: {stray[:5]}")
            rest = [d for d in ids if d not in chosen]
            rid = reviews.record(conn, "split", chosen, rest, reviewer=reviewer, deer_a=deer, note=note,
                                 source="cli")
            what, involved = f"split {len(chosen)} sighting(s) off deer {deer}", ids
        elif action == "name":
            deer, name = int(args[0]), " ".join(args[1:])
            rid = reviews.record(conn, "name", _members(conn, deer), reviewer=reviewer, name=name, deer_a=deer,
                                 note=note, source="cli")
            what, involved = f"deer {deer} is called {name}", []
        elif action == "unidentifiable":
            rid = reviews.record(conn, "unidentifiable", list(args), reviewer=reviewer, note=note, source="cli")
            what, involved = f"{len(args)} sighting(s) left out of matching", list(args)
        elif action == "undo":
            undone = reviews.undo(conn, int(args[0]), reviewer=reviewer, source="cli", note=note)
            rid = int(args[0])
            what = f"undid decision {rid} ({undone.kind})"
            involved = [] if undone.kind in ("name", "skip") else list(undone.a) + list(undone.b)
        else:
            raise reviews.ReviewError(f"unknown action {action!r}")
    line = f"decision {rid}: {what}"
    if apply and involved:
        s = reviews.apply(engine, involved)
        if s is not None:
            line += f"; replayed from {s.partition_key} ({s.decided + s.replayed} sightings decided again, {s.deer_total} deer)"
        else:
            line += "; recorded (nothing decided yet here: it takes effect at the next materialisation)"
    elif involved:
        line += "; recorded only (takes effect at the next materialisation)"
    return line


def main(argv: list[str]) -> int:
    from deer_pipeline import db
    from deer_pipeline.identity import reviews
    from deer_pipeline.review.cli import default_reviewer

    p = argparse.ArgumentParser(prog="deer-pipeline id", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=ACTIONS)
    p.add_argument("args", nargs="*")
    p.add_argument("--reviewer", default=None)
    p.add_argument("--note", default=None)
    p.add_argument("--no-apply", action="store_true")
    a = p.parse_args(argv)
    need = {"merge": 2, "split": 2, "name": 2, "unidentifiable": 1, "undo": 1, "list": 0}[a.action]
    if len(a.args) < need:
        p.error(f"{a.action} needs at least {need} argument(s)")
    engine = db.get_engine()
    if a.action == "list":
        with engine.connect() as conn:
            for r in reviews.all_reviews(conn):
                status = f"undoes {r.undoes}" if r.kind == "undo" else (f"undone by {r.undone_by}" if r.undone_by else "stands")
                print(f"{r.review_id:>5} {r.kind:<15} {len(r.a):>3}/{len(r.b):<3} {r.name or '':<12} "
                      f"{r.reviewer:<12} {r.created_at:%Y-%m-%d %H:%M:%S} {status}")
        return 0
    try:
        print(run(engine, a.action, a.args, a.reviewer or default_reviewer(), a.note, not a.no_apply))
    except (reviews.ReviewError, ValueError) as exc:
        print(f"deer-pipeline id {a.action}: {exc}", file=sys.stderr)
        return 2
    return 0
