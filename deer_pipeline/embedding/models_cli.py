"""``deer-pipeline models``: which embedder the pipeline uses.

    deer-pipeline models register MODEL_DIR | miewid | megadescriptor | dinov2 | default
    deer-pipeline models show

``register`` checks the model completely (card, checksum, network) before recording it; the
``embeddings`` partitions then turn stale (a backfill embeds the new version next to the old
vectors). ``register default`` switches back to the default ensemble without re-embedding.
"""

from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="deer-pipeline models", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("register", help="make a trained model (its folder) or a downloaded backbone the pipeline's embedder")
    r.add_argument("target", help="MODEL_DIR written by `deer-pipeline train`, a backbone name, or 'default'")
    sub.add_parser("show", help="the registered embedder and the models the pipeline embeds with")
    args = p.parse_args(argv)
    from deer_pipeline.embedding import registry

    if args.cmd == "show":
        print(json.dumps(registry.show(), indent=2))
        return 0
    try:
        out = registry.register(args.target)
    except registry.RegistryError as exc:
        print(f"deer-pipeline models register: {exc}", file=sys.stderr)
        return 2
    if out["model"] is None:
        print(f"registered: the default ensemble ({', '.join(out['models'])}); vectors of earlier versions "
              f"in the store are used again, nothing is re-embedded")
    else:
        print(f"registered: {out['model']} ({out['weights']})\nembedding version: {out['embedding_version']}\n"
              f"the embeddings partitions are now stale: backfill them to embed this version "
              f"(the old vectors stay; `deer-pipeline models register default` switches back)")
    return 0
