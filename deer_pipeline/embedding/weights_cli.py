"""``deer-pipeline weights``: the local cache of downloadable re-identification backbones.

    deer-pipeline weights fetch NAME            (internet: from the Hugging Face hub)
    deer-pipeline weights import NAME FILE [--sha256 HEX]   (air-gapped: a file copied here)
    deer-pipeline weights list

NAME is miewid, megadescriptor or dinov2. The file is checked (checksum, then loaded into the
architecture) before it is stored in ``$DEER_WEIGHTS_DIR`` (default ``.deer/weights``); its
sha256 is recorded and is part of the embedding version.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    from deer_pipeline.embedding import backbones
    from deer_pipeline.embedding.models import EmbedderError, WeightsUnavailable

    p = argparse.ArgumentParser(prog="deer-pipeline weights", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fetch", help="download a backbone's weights from the Hugging Face hub")
    f.add_argument("name", choices=backbones.NAMES)
    f.add_argument("--revision", help="hub revision (default: main)")
    i = sub.add_parser("import", help="store a weights file downloaded elsewhere")
    i.add_argument("name", choices=backbones.NAMES)
    i.add_argument("file")
    i.add_argument("--sha256", help="expected sha256 of the file (e.g. from the hub's file page)")
    sub.add_parser("list", help="backbones, where their weights go, and what is cached")
    args = p.parse_args(argv)
    try:
        if args.cmd == "list":
            rows = []
            for name, b in backbones.BACKBONES.items():
                m = backbones.read_manifest(name)
                rows.append({"name": name, "title": b.title, "repo": b.repo, "file": str(backbones.cached_file(name)),
                             "cached": bool(m), "sha256": (m or {}).get("sha256"), "licence": b.licence})
            print(json.dumps(rows, indent=2))
            return 0
        if args.cmd == "fetch":
            manifest = backbones.fetch_weights(args.name, args.revision)
        else:
            manifest = backbones.import_weights(args.name, args.file, args.sha256)
    except (EmbedderError, WeightsUnavailable) as exc:
        print(f"deer-pipeline weights {args.cmd}: {exc}", file=sys.stderr)
        return 2
    backbones.warn_licence(args.name)
    spec = backbones.resolve_embedder(args.name)
    print(f"{args.name}: stored {backbones.cached_file(args.name)} (sha256 {manifest['sha256']})\n"
          f"embedding version: {spec.version}")
    return 0
