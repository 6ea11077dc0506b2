"""Embedding vectors in PostgreSQL + pgvector: versions, idempotent writes, reads, HNSW search.

Plain SQL through SQLAlchemy ``text()``; vectors travel as pgvector text literals
(:func:`deer_pipeline.db.vector_literal`) and come back as ``real[]``. Every vector row is keyed by
(detection_id, embedding_version), so vectors of several versions live side by side: a new
version is embedded next to the old one and a rollback finds the old vectors still there.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable, Mapping, Sequence

import numpy as np
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline.db import vector_literal
from deer_pipeline.embedding.models import EMBEDDING_DIM

# EMBEDDING_DIM (imported): the vector column's size (sql/: vector(512)), defined once with the models
WRITE_CHUNK = 500


class EmbeddingStoreError(ValueError):
    pass


# --------------------------------------------------------------------------------------------
# Versions
# --------------------------------------------------------------------------------------------

_VERSION_FIELDS = ("embedding_version", "model", "backbone", "weights_sha256", "reduction_sha256",
                   "preprocessing", "dim")


def _version_row(info) -> dict:
    if hasattr(info, "version_info"):
        info = info.version_info()
    row = dict(info)
    missing = [f for f in _VERSION_FIELDS if row.get(f) in (None, "")]
    if missing:
        raise EmbeddingStoreError(f"embedding version info lacks {missing}")
    row["details"] = json.dumps(row.get("details") or {}, sort_keys=True)
    return row


def register_version(engine: Engine, info) -> bool:
    """Record an embedding version (an ``EmbedderSpec`` or its ``version_info()`` dict).

    Idempotent: returns True when newly registered. A version string already registered with
    different weights or reduction hashes is refused (it would make two kinds of vectors look alike).
    """
    row = _version_row(info)
    with engine.begin() as conn:
        created = conn.execute(sa.text(
            "INSERT INTO embedding_versions (embedding_version, model, backbone, weights_sha256, "
            " reduction_sha256, preprocessing, dim, details) "
            "VALUES (:embedding_version, :model, :backbone, :weights_sha256, :reduction_sha256, "
            " :preprocessing, :dim, CAST(:details AS jsonb)) "
            "ON CONFLICT (embedding_version) DO NOTHING RETURNING embedding_version"), row).first()
        if created:
            return True
        old = conn.execute(sa.text(
            "SELECT model, weights_sha256, reduction_sha256, preprocessing, dim "
            "FROM embedding_versions WHERE embedding_version = :v"), {"v": row["embedding_version"]}).one()
    for f in ("model", "weights_sha256", "reduction_sha256", "preprocessing", "dim"):
        if getattr(old, f) != row[f]:
            raise EmbeddingStoreError(
                f"embedding version {row['embedding_version']!r} is already registered with "
                f"{f}={getattr(old, f)!r}, not {row[f]!r}")
    return False


# --------------------------------------------------------------------------------------------
# HNSW indexes: one partial index per embedding version (sql/009_hnsw_per_version.sql)
# --------------------------------------------------------------------------------------------

def vector_index_name(conn: sa.Connection, version: str) -> str:
    """Name of the HNSW index of one embedding version (whether it exists or not)."""
    return conn.execute(sa.text("SELECT deer_vector_index_name(:v)"), {"v": version}).scalar_one()


def vector_indexes(conn: sa.Connection) -> dict[str, str]:
    """Existing per-version HNSW indexes: index name -> its definition."""
    return dict(conn.execute(sa.text(
        "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'embeddings' "
        "AND indexname LIKE 'embeddings\\_hnsw\\_%'")).all())


def drop_vector_indexes(conn: sa.Connection) -> list[str]:
    """Drop every per-version HNSW index (before a bulk load: inserting through an HNSW index
    costs milliseconds per vector at 100k+ rows; building it afterwards is far cheaper)."""
    names = sorted(vector_indexes(conn))
    for name in names:
        conn.execute(sa.text(f'DROP INDEX IF EXISTS "{name}"'))
    return names


def ensure_vector_indexes(conn: sa.Connection) -> list[str]:
    """Build the HNSW index of every registered version that lacks one (after a bulk load);
    returns the index names."""
    return list(conn.execute(sa.text(
        "SELECT deer_ensure_vector_index(embedding_version) FROM embedding_versions "
        "ORDER BY embedding_version")).scalars())


def registered_versions(engine: Engine, model: str | None = None) -> list[dict]:
    sql = ("SELECT embedding_version, model, backbone, weights_sha256, reduction_sha256, "
           "preprocessing, dim, details, created_at FROM embedding_versions")
    params = {}
    if model:
        sql += " WHERE model = :m"
        params["m"] = model
    with engine.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.text(sql + " ORDER BY created_at, embedding_version"), params)]


# --------------------------------------------------------------------------------------------
# Writes
# --------------------------------------------------------------------------------------------

@dataclass
class WriteCounts:
    inserted: int = 0     # new (detection, version) rows
    updated: int = 0      # a failed row replaced (retried)
    unchanged: int = 0    # an ok row already there: left as it was

    def __add__(self, other: "WriteCounts") -> "WriteCounts":
        return WriteCounts(self.inserted + other.inserted, self.updated + other.updated,
                           self.unchanged + other.unchanged)


def _check_vector(detection_id: str, vector) -> str:
    v = np.asarray(vector, dtype=np.float32).reshape(-1)
    if v.shape != (EMBEDDING_DIM,):
        raise EmbeddingStoreError(f"vector of {detection_id!r} has {v.size} values, not {EMBEDDING_DIM}")
    if not np.isfinite(v).all():
        raise EmbeddingStoreError(f"vector of {detection_id!r} has non-finite values")
    return vector_literal(v)


def write_embeddings(engine: Engine, version: str,
                     rows: Iterable[tuple[str, object, str, str | None]]) -> WriteCounts:
    """Write ``(detection_id, vector | None, status, reason)`` rows for ``version``.

    Idempotent on (detection_id, embedding_version): an existing ``ok`` row is left untouched
    (same version, same vector), an existing ``failed`` row is replaced (a retry).
    """
    ids, vecs, statuses, reasons = [], [], [], []
    for detection_id, vector, status, reason in rows:
        if status not in ("ok", "failed"):
            raise EmbeddingStoreError(f"status must be 'ok' or 'failed', not {status!r}")
        if status == "ok":
            if vector is None:
                raise EmbeddingStoreError(f"status 'ok' without a vector for {detection_id!r}")
            vecs.append(_check_vector(detection_id, vector))
        else:
            vecs.append(None)
        ids.append(str(detection_id))
        statuses.append(status)
        reasons.append(None if reason is None else str(reason)[:1000])
    counts = WriteCounts()
    if not ids:
        return counts
    sql = sa.text(
        "INSERT INTO embeddings (detection_id, embedding_version, vector, status, reason) "
        "SELECT t.d, :version, CAST(t.v AS vector), t.s, t.r FROM unnest("
        " CAST(:ids AS text[]), CAST(:vecs AS text[]), CAST(:statuses AS text[]),"
        " CAST(:reasons AS text[])) AS t(d, v, s, r) "
        "ON CONFLICT (detection_id, embedding_version) DO UPDATE SET vector = EXCLUDED.vector,"
        " status = EXCLUDED.status, reason = EXCLUDED.reason, created_at = now() "
        "WHERE embeddings.status <> 'ok' "
        "RETURNING (xmax = 0) AS inserted")
    with engine.begin() as conn:
        for start in range(0, len(ids), WRITE_CHUNK):
            end = start + WRITE_CHUNK
            got = [r.inserted for r in conn.execute(sql, {
                "version": version, "ids": ids[start:end], "vecs": vecs[start:end],
                "statuses": statuses[start:end], "reasons": reasons[start:end]})]
            counts.inserted += sum(1 for g in got if g)
            counts.updated += sum(1 for g in got if not g)
            counts.unchanged += (min(end, len(ids)) - start) - len(got)
    return counts


# --------------------------------------------------------------------------------------------
# Reads
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class CropToEmbed:
    detection_id: str
    crop_path: str
    crop_sha256: str | None


_PARTITION_CROPS = (
    "FROM crops c JOIN detections d ON d.detection_id = c.detection_id "
    "WHERE d.camera_id = :camera AND d.day = CAST(:day AS date) "
    "AND c.status = 'ok' AND d.status = 'ok' AND c.crop_path IS NOT NULL")


def partition_crops(engine: Engine, camera_id: str, day: str) -> list[CropToEmbed]:
    """Every ok crop of a camera x day partition."""
    with engine.connect() as conn:
        return [CropToEmbed(r.detection_id, r.crop_path, r.crop_sha256) for r in conn.execute(sa.text(
            "SELECT c.detection_id, c.crop_path, c.crop_sha256 " + _PARTITION_CROPS
            + " ORDER BY c.detection_id"), {"camera": camera_id, "day": str(day)})]


def crops_to_embed(engine: Engine, camera_id: str, day: str, version: str,
                   include_failed: bool = True) -> list[CropToEmbed]:
    """Ok crops of the partition without an ``ok`` vector of ``version`` (with
    ``include_failed=False``, crops that failed before are not retried)."""
    with engine.connect() as conn:
        return [CropToEmbed(r.detection_id, r.crop_path, r.crop_sha256) for r in conn.execute(sa.text(
            "SELECT c.detection_id, c.crop_path, c.crop_sha256 " + _PARTITION_CROPS
            + " AND NOT EXISTS (SELECT 1 FROM embeddings e WHERE e.detection_id = c.detection_id"
              " AND e.embedding_version = :v AND (e.status = 'ok' OR NOT :retry))"
              " ORDER BY c.detection_id"),
            {"camera": camera_id, "day": str(day), "v": version, "retry": include_failed})]


def partition_embedding_counts(engine: Engine, camera_id: str, day: str,
                               versions: Sequence[str]) -> dict[str, dict[str, int]]:
    """{version: {'crops': ok crops, 'ok': vectors, 'failed': failures, 'missing': neither}}."""
    out = {}
    with engine.connect() as conn:
        for v in versions:
            r = conn.execute(sa.text(
                "SELECT count(*) AS crops, count(*) FILTER (WHERE e.status = 'ok') AS ok,"
                " count(*) FILTER (WHERE e.status = 'failed') AS failed,"
                " count(*) FILTER (WHERE e.detection_id IS NULL) AS missing "
                "FROM crops c JOIN detections d ON d.detection_id = c.detection_id "
                "LEFT JOIN embeddings e ON e.detection_id = c.detection_id AND e.embedding_version = :v "
                "WHERE d.camera_id = :camera AND d.day = CAST(:day AS date) "
                "AND c.status = 'ok' AND d.status = 'ok' AND c.crop_path IS NOT NULL"),
                {"camera": camera_id, "day": str(day), "v": v}).one()
            out[v] = dict(r._mapping)
    return out


def load_vectors(engine: Engine, version: str,
                 detection_ids: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    """``(ids, vectors (n, 512) float32)`` of the ok vectors of ``version``: sorted by detection id,
    or in the order of ``detection_ids`` (ids without a vector left out)."""
    sql = ("SELECT detection_id, CAST(vector AS real[]) AS v FROM embeddings "
           "WHERE embedding_version = :version AND status = 'ok'")
    params: dict = {"version": version}
    if detection_ids is not None:
        sql += " AND detection_id = ANY(CAST(:ids AS text[]))"
        params["ids"] = [str(d) for d in detection_ids]
    with engine.connect() as conn:
        rows = conn.execute(sa.text(sql + " ORDER BY detection_id"), params).all()
    if detection_ids is not None:
        by_id = {r.detection_id: r.v for r in rows}
        ordered = [(d, by_id[d]) for d in dict.fromkeys(str(d) for d in detection_ids) if d in by_id]
    else:
        ordered = [(r.detection_id, r.v) for r in rows]
    ids = [d for d, _ in ordered]
    vecs = (np.asarray([v for _, v in ordered], dtype=np.float32) if ordered
            else np.zeros((0, EMBEDDING_DIM), dtype=np.float32))
    return ids, vecs


def load_vectors_by_model(engine: Engine, versions: Mapping[str, str],
                          detection_ids: Sequence[str] | None = None) -> tuple[list[str], dict[str, np.ndarray]]:
    """Vectors of several versions (model -> version) for the detections that have all of them,
    rows aligned across models (the input of ``embedders.ensemble_similarity``)."""
    loaded = {m: load_vectors(engine, v, detection_ids) for m, v in versions.items()}
    common = None
    for ids, _ in loaded.values():
        common = set(ids) if common is None else common & set(ids)
    order = [d for d in (next(iter(loaded.values()))[0] if loaded else []) if d in (common or set())]
    out = {}
    for m, (ids, vecs) in loaded.items():
        pos = {d: i for i, d in enumerate(ids)}
        out[m] = vecs[[pos[d] for d in order]] if order else np.zeros((0, EMBEDDING_DIM), np.float32)
    return order, out


def count_embeddings(engine: Engine, version: str | None = None) -> int:
    sql = "SELECT count(*) FROM embeddings"
    params = {}
    if version is not None:
        sql += " WHERE embedding_version = :v"
        params["v"] = version
    with engine.connect() as conn:
        return int(conn.execute(sa.text(sql), params).scalar_one())

