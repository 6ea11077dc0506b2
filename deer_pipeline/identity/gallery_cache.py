"""The gallery kept in memory across decisions of one process.

A decision takes the gallery of its database and embedding versions out of the cache, checks
it against the generation counter the store keeps (``gallery_generation``, bumped by a trigger
in the same transaction by every statement that writes sightings, deletes embeddings or changes
a detection's sex; see sql/008), applies its own changes (withdrawn rows removed, decided rows
added, new deer renamed to their real ids) and, once its transaction has committed, puts it
back with the generation it left. A gallery whose generation differs from the store's (another
process or path changed the sightings) is never used: the decision reloads it. A decision that
fails puts nothing back (the gallery it changed is dropped).

Plain logic, no Dagster. At most ``GALLERY_CACHE_ENTRIES`` galleries are kept (least recently
used dropped first); ``clear()`` empties the cache.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

from deer_pipeline.identity.gallery import Gallery
from deer_pipeline.settings import GALLERY_CACHE_ENTRIES

_lock = threading.Lock()
_entries: "OrderedDict[tuple, _Entry]" = OrderedDict()


@dataclass
class _Entry:
    generation: tuple[str, int]
    gallery: Gallery


def cache_key(engine, versions, weights) -> tuple:
    """Database URL (password hidden) + component versions + ensemble weights."""
    return (engine.url.render_as_string(hide_password=True), tuple(versions),
            tuple(sorted((str(m), float(w)) for m, w in weights.items())))


def checkout(key: tuple, generation: tuple[str, int]) -> tuple[Gallery | None, str]:
    """The cached gallery for ``key`` if it is of this generation, taken out of the cache (no
    one else uses it meanwhile); (None, why) otherwise: ``none`` or ``stale``."""
    with _lock:
        entry = _entries.pop(key, None)
    if entry is None:
        return None, "none"
    if entry.generation != generation:
        return None, "stale"
    return entry.gallery, "hit"


def checkin(key: tuple, generation: tuple[str, int], gallery: Gallery) -> None:
    """Keep ``gallery`` as the store's gallery of ``generation`` (after the commit)."""
    with _lock:
        _entries.pop(key, None)
        _entries[key] = _Entry(generation, gallery)
        while len(_entries) > max(GALLERY_CACHE_ENTRIES, 0):
            _entries.popitem(last=False)


def clear() -> None:
    with _lock:
        _entries.clear()
