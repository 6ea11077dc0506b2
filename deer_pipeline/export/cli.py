"""``deer-pipeline export camtrap-dp OUT_DIR`` and ``deer-pipeline export sightings OUT.csv``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="deer-pipeline export",
                                     description="Export deer and sightings in standard forms.")
    sub = parser.add_subparsers(dest="what", required=True)
    cdp = sub.add_parser("camtrap-dp", help="a Camtrap DP 1.0 package (datapackage.json, deployments.csv, "
                                            "media.csv, observations.csv) for GBIF and camera-trap tools")
    cdp.add_argument("out_dir", type=Path, help="a new or empty folder")
    cdp.add_argument("--media-root", help="filePath is relative to this folder (default: the photos' common folder)")
    cdp.add_argument("--title", help="project title")
    cdp.add_argument("--contributor", help="name of the person or organisation publishing the data")
    cdp.add_argument("--data-license", help="licence of the data (default CC0-1.0)")
    cdp.add_argument("--media-license", help="licence of the photos (default CC-BY-4.0)")
    cdp.add_argument("--no-validate", action="store_true",
                     help="skip the check against the Camtrap DP 1.0 profile and schemas")
    sig = sub.add_parser("sightings", help="one flat CSV row per sighting: deer, camera, time, box, score")
    sig.add_argument("out_csv", type=Path)
    sig.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)

    from deer_pipeline import db
    from deer_pipeline.export import camtrap_dp, sightings

    engine = db.get_engine()
    if args.what == "sightings":
        try:
            n = sightings.write_sightings(engine, args.out_csv, overwrite=args.overwrite)
        except FileExistsError as exc:
            print(f"deer-pipeline export sightings: {exc}", file=sys.stderr)
            return 2
        print(f"wrote {n} sightings to {args.out_csv}")
        return 0
    try:
        report = camtrap_dp.write_package(engine, args.out_dir, media_root=args.media_root, title=args.title,
                                          contributor=args.contributor, data_license=args.data_license,
                                          media_license=args.media_license)
    except camtrap_dp.ExportError as exc:
        print(f"deer-pipeline export camtrap-dp: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    if not args.no_validate:
        errors = camtrap_dp.validate_package(args.out_dir)
        if errors:
            print(f"NOT valid Camtrap DP {camtrap_dp.VERSION} ({len(errors)} problem(s)):", file=sys.stderr)
            for e in errors[:50]:
                print(f"  {e}", file=sys.stderr)
            return 1
        print(f"  valid Camtrap DP {camtrap_dp.VERSION} (profile and table schemas, checked offline with frictionless)")
    return 0
