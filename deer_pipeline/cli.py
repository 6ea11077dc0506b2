"""The ``deer-pipeline`` command. Each subcommand lives in the module of its area and exposes
``main(argv) -> int``; this file only dispatches, so areas stay independent."""

from __future__ import annotations

import importlib
import logging
import sys
import warnings

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (module, one-line help)
    "db": ("deer_pipeline.ops.db_cli", "database: 'db migrate' applies migrations, 'db url' prints the URL"),
    "ingest": ("deer_pipeline.detections.ingest", "ingest MegaDetector JSON, a detections CSV or an image folder"),
    "sample": ("deer_pipeline.sample", "write the deterministic trail-camera sample (images + detections + truth)"),
    "demo": ("deer_pipeline.demo", "start the embedded database, ingest the sample, materialise every asset"),
    "embed": ("deer_pipeline.embedding.cli", "embed images with one model and write an .npy file"),
    "status": ("deer_pipeline.ops.status", "counts, assignment rate, thresholds, versions, last checks"),
    "evaluate": ("deer_pipeline.evaluation.cli", "evaluate re-identification on labelled photos"),
    "train": ("deer_pipeline.embedding.train_cli", "train a re-identification model on labelled individuals"),
    "models": ("deer_pipeline.embedding.models_cli", "register the pipeline's embedder (trained model, backbone or default)"),
    "weights": ("deer_pipeline.embedding.weights_cli", "fetch or import re-identification backbone weights"),
    "ui": ("deer_pipeline.ops.ui", "start the Dagster UI (dagster dev) on the embedded database"),
    "review": ("deer_pipeline.review.cli", "the review web app (queue, deer, corrections); 'review export|apply FILE.csv'"),
    "id": ("deer_pipeline.review.id_cli", "corrections for scripts: 'id merge|split|name|unidentifiable|undo|list'"),
    "recover": ("deer_pipeline.ops.recovery", "fail runs whose process is gone, free the pool slots of finished runs"),
    "cameras": ("deer_pipeline.export.cameras", "'cameras import cameras.csv': camera sites and deployment dates"),
    "export": ("deer_pipeline.export.cli", "'export camtrap-dp OUT_DIR' (Camtrap DP 1.0), 'export sightings OUT.csv'"),
}


def usage() -> str:
    lines = ["usage: deer-pipeline COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _exit_cleanly_on_sigterm() -> None:
    """SIGTERM (``kill``, ``docker stop``) ends a command like Ctrl-C does: a run in progress is
    marked failed and frees its pool slots, and the embedded PostgreSQL is stopped on exit."""
    import signal

    def interrupt(signum, _frame):
        raise KeyboardInterrupt(f"signal {signum}")

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, interrupt)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("deer_pipeline").setLevel(logging.INFO)
    # Dagster flags features we use on purpose (backfill policies, partitioned checks) as beta /
    # preview on every import; the command line is for people, so keep those out of its output.
    warnings.filterwarnings("ignore", message=r".*is currently in (beta|preview)")
    warnings.filterwarnings("ignore", message=r"XDG_RUNTIME_DIR is not set")  # pgserver, harmless
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"deer-pipeline: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    _exit_cleanly_on_sigterm()
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
