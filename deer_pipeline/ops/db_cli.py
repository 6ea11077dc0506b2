"""``deer-pipeline db migrate|url|version``."""

from __future__ import annotations

import argparse

from deer_pipeline import db


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deer-pipeline db")
    parser.add_argument("action", choices=["migrate", "url", "version"])
    args = parser.parse_args(argv)
    if args.action == "url":
        print(db.database_url())
        return 0
    engine = db.get_engine(migrate=False)
    if args.action == "migrate":
        applied = db.apply_migrations(engine)
        print(f"applied migrations: {applied or 'none (up to date)'}; "
              f"schema version {db.schema_version(engine)}")
    else:
        print(db.schema_version(engine))
    return 0
