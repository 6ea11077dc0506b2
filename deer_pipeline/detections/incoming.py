"""The drop folder: detector files (MegaDetector / SpeciesNet JSON) copied into
``DEER_INCOMING_DIR`` are found here, each new or changed file once, so a docker-compose box
needs no shell to bring data in. Plain logic, no Dagster: the sensor in ``defs/incoming.py``
keeps the state (its cursor) and requests one ingest run per file.

A file is taken once it has not changed for ``settle_s`` seconds (it may still be copying);
hidden files and names ending in ``.part``/``.tmp``/``.partial`` are ignored. The state maps
each file (relative path) to ``<size>:<mtime_ns>``, so a file that is replaced is taken again
(ingestion itself adds nothing twice).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

DETECTOR_SUFFIXES = (".json",)
IGNORED_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")


@dataclass(frozen=True)
class DroppedFile:
    path: Path              # absolute
    name: str               # relative to the drop folder
    signature: str          # <size>:<mtime_ns>


def _candidates(folder: Path):
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.is_file() and p.suffix.lower() in DETECTOR_SUFFIXES and not p.name.lower().endswith(IGNORED_SUFFIXES):
            yield p, rel.as_posix()


def load_state(cursor: str | None) -> dict[str, str]:
    if not cursor:
        return {}
    try:
        state = json.loads(cursor)
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in state.items()} if isinstance(state, dict) else {}


def dump_state(state: dict[str, str]) -> str:
    return json.dumps(state, sort_keys=True, separators=(",", ":"))


def new_files(folder, state: dict[str, str], settle_s: float = 10.0,
              now: float | None = None) -> tuple[list[DroppedFile], list[str]]:
    """(files not seen in ``state`` with this signature and settled, names still settling)."""
    folder = Path(folder)
    now = time.time() if now is None else now
    found, settling = [], []
    for path, name in _candidates(folder):
        try:
            st = path.stat()
        except OSError:
            continue
        signature = f"{st.st_size}:{st.st_mtime_ns}"
        if state.get(name) == signature:
            continue
        if now - st.st_mtime < settle_s or st.st_size == 0:
            settling.append(name)
            continue
        found.append(DroppedFile(path.resolve(), name, signature))
    return found, settling
