"""SQL access for identities: partition detections, vectors, the gallery of decided sightings,
withdrawal for replay, deer and their profile vectors, similarity scores, check results.

Plain SQLAlchemy/psycopg, no Dagster. Vectors are read through a psycopg cursor with a binary
loader registered on that cursor only (it returns numpy float32 arrays; other code sharing the
pooled connection still gets pgvector's text form).
"""

from __future__ import annotations

import struct
from collections import defaultdict
from dataclasses import dataclass
from datetime import date, datetime
from typing import Iterable, Mapping, Sequence

import numpy as np
import sqlalchemy as sa

from deer_pipeline.identity.flanks import SIDE_CODE, other_flank


class MatchingError(RuntimeError):
    """The decision cannot be made (missing vectors, unknown version, ...); nothing is written."""


def partition_key_text(camera_id: str, day: str | date) -> str:
    """The text form of a camera x day partition key, as Dagster prints it: ``camera|day``."""
    return f"{camera_id}|{day}"


def vector_cursor(conn: sa.Connection):
    """A binary psycopg cursor on ``conn``'s connection (same transaction) that loads
    ``vector`` columns as numpy float32 arrays and sends numpy arrays passed with ``%b`` as
    binary ``vector`` parameters (no text formatting of 512 floats per query)."""
    from psycopg.adapt import Dumper, Loader
    from psycopg.pq import Format

    class _VectorLoader(Loader):
        format = Format.BINARY

        def load(self, data):
            # pgvector binary: int16 dim, int16 unused, dim x float32 (big endian)
            return np.frombuffer(bytes(data), dtype=">f4", offset=4).astype(np.float32)

    info = conn.connection.info            # per DBAPI connection: look the type up once
    oid = info.get("deer_vector_oid")
    if oid is None:
        oid = info["deer_vector_oid"] = conn.execute(sa.text("SELECT 'vector'::regtype::oid")).scalar_one()

    class _VectorDumper(Dumper):
        format = Format.BINARY

        def dump(self, obj):
            a = np.asarray(obj, dtype=">f4").ravel()
            return struct.pack(">HH", a.shape[0], 0) + a.tobytes()

    _VectorDumper.oid = oid
    raw = conn.connection.driver_connection
    cur = raw.cursor(binary=True)
    cur.adapters.register_loader(oid, _VectorLoader)
    cur.adapters.register_dumper(np.ndarray, _VectorDumper)
    return cur


def resolve_versions(conn: sa.Connection, models: Iterable[str],
                     explicit: Mapping[str, str] | None = None) -> dict[str, str]:
    """model -> embedding version to use.

    Explicit versions are checked against ``embedding_versions``; otherwise the most recent
    version of each model that has at least one stored vector is used. A model with no version
    is a clear failure, never a silent fallback."""
    models = list(models)
    out: dict[str, str] = {}
    if explicit:
        missing_models = [m for m in models if m not in explicit]
        if missing_models:
            raise MatchingError(f"embedding_versions names no version for model(s) {missing_models}; "
                                f"given: {dict(explicit)}")
        rows = {r.embedding_version: r.model for r in conn.execute(sa.text(
            "SELECT embedding_version, model FROM embedding_versions "
            "WHERE embedding_version = ANY(:v)"), {"v": [explicit[m] for m in models]})}
        for m in models:
            v = explicit[m]
            if v not in rows:
                raise MatchingError(f"embedding version {v!r} (model {m!r}) is not in embedding_versions; "
                                    "run the embeddings asset for it or fix the configured version")
            if rows[v] != m:
                raise MatchingError(f"embedding version {v!r} belongs to model {rows[v]!r}, not {m!r}")
            out[m] = v
        return out
    for m in models:
        v = conn.execute(sa.text(
            "SELECT ev.embedding_version FROM embedding_versions ev "
            "WHERE ev.model = :m AND EXISTS (SELECT 1 FROM embeddings e "
            "  WHERE e.embedding_version = ev.embedding_version AND e.status = 'ok') "
            "ORDER BY ev.created_at DESC, ev.embedding_version DESC LIMIT 1"), {"m": m}).scalar()
        if v is None:
            known = [r[0] for r in conn.execute(sa.text(
                "SELECT DISTINCT model FROM embedding_versions ORDER BY 1"))]
            raise MatchingError(
                f"no stored embeddings for model {m!r} (ensemble_weights names it); models with "
                f"versions: {known or 'none'}. Materialise the embeddings for {m!r} or change "
                "ensemble_weights / embedding_versions")
        out[m] = v
    return out


@dataclass
class DetectionRow:
    detection_id: str
    image_id: int
    captured_at: datetime | None
    burst_id: str | None
    x: float
    y: float
    w: float
    h: float
    sex: str
    crop_status: str | None


def partition_detections(conn: sa.Connection, camera_id: str, day: str | date) -> list[DetectionRow]:
    """Detections of one camera x day partition that the detector accepted (status ok)."""
    rows = conn.execute(sa.text(
        "SELECT d.detection_id, d.image_id, d.captured_at, d.encounter_id, "
        "       coalesce(d.bbox_x, 0) x, coalesce(d.bbox_y, 0) y, coalesce(d.bbox_w, 0) w, "
        "       coalesce(d.bbox_h, 0) h, coalesce(d.sex, 'unknown') sex, c.status crop_status "
        "FROM detections d LEFT JOIN crops c ON c.detection_id = d.detection_id "
        "WHERE d.camera_id = :c AND d.day = :d AND d.status = 'ok' "
        "ORDER BY d.captured_at NULLS LAST, d.detection_id"),
        {"c": camera_id, "d": as_date(day)})
    return [DetectionRow(r.detection_id, r.image_id, r.captured_at, r.encounter_id,
                         r.x, r.y, r.w, r.h, r.sex, r.crop_status) for r in rows]


def detections_by_id(conn: sa.Connection, ids: Sequence[str]) -> dict[str, DetectionRow]:
    if not ids:
        return {}
    rows = conn.execute(sa.text(
        "SELECT d.detection_id, d.image_id, d.captured_at, d.encounter_id, "
        "       coalesce(d.bbox_x, 0) x, coalesce(d.bbox_y, 0) y, coalesce(d.bbox_w, 0) w, "
        "       coalesce(d.bbox_h, 0) h, coalesce(d.sex, 'unknown') sex, c.status crop_status "
        "FROM detections d LEFT JOIN crops c ON c.detection_id = d.detection_id "
        "WHERE d.detection_id = ANY(:ids)"), {"ids": list(ids)})
    return {r.detection_id: DetectionRow(r.detection_id, r.image_id, r.captured_at, r.encounter_id,
                                         r.x, r.y, r.w, r.h, r.sex, r.crop_status) for r in rows}


def embedding_states(conn: sa.Connection, ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """detection_id -> {embedding_version: status} for every stored embedding row."""
    out: dict[str, dict[str, str]] = defaultdict(dict)
    if not ids:
        return out
    for r in conn.execute(sa.text(
            "SELECT detection_id, embedding_version, "
            "  CASE WHEN status = 'ok' AND vector IS NOT NULL THEN 'ok' ELSE status END st "
            "FROM embeddings WHERE detection_id = ANY(:ids)"), {"ids": list(ids)}):
        out[r.detection_id][r.embedding_version] = r.st
    return out


def load_vectors(conn: sa.Connection, ids: Sequence[str], version: str) -> dict[str, np.ndarray]:
    """detection_id -> vector for one embedding version (ok rows only)."""
    if not ids:
        return {}
    cur = vector_cursor(conn)
    cur.execute("SELECT detection_id, vector FROM embeddings WHERE embedding_version = %s "
                "AND status = 'ok' AND vector IS NOT NULL AND detection_id = ANY(%s)",
                (version, list(ids)))
    return {d: v for d, v in cur.fetchall()}


@dataclass
class Withdrawn:
    detection_id: str
    encounter_key: str
    deer_id: int
    partition_key: str
    captured_at: datetime | None


def _keys(partition_keys: str | Sequence[str]) -> list[str]:
    return [partition_keys] if isinstance(partition_keys, str) else list(partition_keys)


def earliest_decided_time(conn: sa.Connection, partition_keys: str | Sequence[str]) -> datetime | None:
    """The earliest capture time decided in any of these partitions."""
    return conn.execute(sa.text("SELECT min(captured_at) FROM sightings WHERE partition_key = ANY(:p)"),
                        {"p": _keys(partition_keys)}).scalar()


def withdraw(conn: sa.Connection, partition_keys: str | Sequence[str], since: datetime | None) -> list[Withdrawn]:
    """Withdraw the partitions' decisions and every decided encounter that started at or after
    ``since`` (those are replayed). Their similarity scores go with them. Returns what was
    withdrawn; deer left without sightings are removed later (see ``finish_deer``)."""
    params = {"p": _keys(partition_keys), "t": since}
    # encounters with a sighting at or after ``since`` and none before it: found through the
    # capture-time and encounter indexes, not by grouping the whole gallery
    later = ("OR encounter_key IN (SELECT l.encounter_key FROM sightings l WHERE l.captured_at >= :t "
             "AND NOT EXISTS (SELECT 1 FROM sightings e WHERE e.encounter_key = l.encounter_key "
             "AND e.captured_at < :t))") if since is not None else ""
    rows = conn.execute(sa.text(
        f"DELETE FROM sightings WHERE partition_key = ANY(:p) {later} "
        "RETURNING detection_id, encounter_key, deer_id, partition_key, captured_at"), params).all()
    out = [Withdrawn(*r) for r in rows]
    conn.execute(sa.text("DELETE FROM similarity_scores WHERE partition_key = ANY(:p) "
                         "OR detection_id = ANY(:ids)"),
                 {"p": params["p"], "ids": [w.detection_id for w in out]})
    return out


def gallery_size(conn: sa.Connection) -> int:
    return conn.execute(sa.text("SELECT count(*) FROM sightings")).scalar_one()


def check_gallery_vectors(conn: sa.Connection, versions: Iterable[str]) -> None:
    """Every stored sighting must have an ok vector for every configured version."""
    for v in versions:
        n = conn.execute(sa.text(
            "SELECT count(*) FROM sightings s WHERE NOT EXISTS (SELECT 1 FROM embeddings e "
            "WHERE e.detection_id = s.detection_id AND e.embedding_version = :v "
            "AND e.status = 'ok' AND e.vector IS NOT NULL)"), {"v": v}).scalar_one()
        if n:
            raise MatchingError(
                f"{n} decided sighting(s) have no vector for embedding version {v!r}: the gallery "
                "was built with another model version. Embed those detections with the configured "
                "version (or configure the version the gallery uses) before deciding more")


def gallery_vectors(conn: sa.Connection, versions: Sequence[str],
                    deer_ids: Sequence[int] | None = None) -> tuple[np.ndarray, list[np.ndarray], list[str]]:
    """(deer ids per row, [matrix per version], detection ids) for the stored sightings, rows
    sorted by deer then detection; optionally only some deer."""
    cur = vector_cursor(conn)
    where = "AND s.deer_id = ANY(%s)" if deer_ids is not None else ""
    mats: list[np.ndarray] = []
    ref_ids: list[str] | None = None
    ref_deer = None
    for v in versions:
        params: tuple = (v,) if deer_ids is None else (v, list(deer_ids))
        cur.execute("SELECT s.deer_id, s.detection_id, e.vector FROM sightings s "
                    "JOIN embeddings e ON e.detection_id = s.detection_id "
                    "AND e.embedding_version = %s AND e.status = 'ok' AND e.vector IS NOT NULL "
                    f"WHERE true {where} ORDER BY s.deer_id, s.detection_id", params)
        rows = cur.fetchall()
        ids = [r[1] for r in rows]
        if ref_ids is None:
            ref_ids = ids
            ref_deer = np.array([r[0] for r in rows], dtype=np.int64)
        elif ids != ref_ids:
            raise MatchingError(f"gallery sightings lack vectors for version {v!r} "
                                f"({len(ids)} vs {len(ref_ids)} rows)")
        mats.append(np.vstack([r[2] for r in rows]).astype(np.float32) if rows
                    else np.zeros((0, 0), np.float32))
    return ref_deer if ref_deer is not None else np.zeros(0, np.int64), mats, ref_ids or []


def gallery_deer_sex_counts(conn: sa.Connection) -> dict[int, tuple[int, int, int]]:
    """deer_id -> (female sightings, male sightings, all sightings) over the stored gallery."""
    return {r.deer_id: (r.f, r.m, r.n) for r in conn.execute(sa.text(
        "SELECT s.deer_id, count(*) FILTER (WHERE d.sex = 'female') f, "
        "       count(*) FILTER (WHERE d.sex = 'male') m, count(*) n "
        "FROM sightings s JOIN detections d ON d.detection_id = s.detection_id GROUP BY s.deer_id"))}


def embedding_row_count(conn: sa.Connection) -> int:
    """Rows in the HNSW index (every version)."""
    return conn.execute(sa.text("SELECT count(*) FROM embeddings WHERE vector IS NOT NULL")).scalar_one()


HNSW_MAX_EF = 1000          # pgvector's upper bound for hnsw.ef_search


class NearestSightings:
    """Nearest stored sightings by the HNSW index, one query per vector, on one cursor.

    Each embedding version has its own HNSW index (a partial index, sql/009), which the
    planner uses only when the query names the version as a constant: the version is written
    into the statement as a quoted literal, so even a generic plan of a prepared statement
    (psycopg prepares a query after five runs) scans that index. pgvector 0.6 applies the
    other WHERE filters (the gallery join, the flank) after the index scan and returns at most
    ``hnsw.ef_search`` rows, so they can leave fewer rows than asked: callers re-query with a
    larger ``ef`` (``query(..., ef=...)``) or fall back to an exact scan (``exact``)."""

    def __init__(self, conn: sa.Connection, version: str):
        self.cur = vector_cursor(conn)
        self.version = version
        self._ef = None
        self._query = nearest_sightings_sql(version)

    def query(self, vector: np.ndarray, ef: int, side: str | None = None) -> list[tuple[int, float]]:
        """(deer_id, cosine similarity) of the decided sightings (in ``sightings``) among the
        ``ef`` nearest vectors of this version; ``side`` (left | right): sightings of the other
        flank are left out (flank-aware)."""
        return [(d, sim) for _, d, sim in self.query_rows(vector, ef, side)]

    def query_rows(self, vector: np.ndarray, ef: int, side: str | None = None) -> list[tuple[str, int, float]]:
        """As ``query``, with each sighting's detection id: (detection_id, deer_id, cosine)."""
        if ef != self._ef:
            self.cur.execute("SELECT set_config('hnsw.ef_search', %s, true)", (str(int(ef)),))
            self._ef = ef
        self.cur.execute(self._query, {"q": np.asarray(vector, np.float32), "ef": int(ef),
                                       "other": other_flank(side)})
        return [(det, d, 1.0 - float(dist)) for det, d, dist in self.cur.fetchall()]

    def exact(self, vector: np.ndarray, side: str | None = None) -> list[tuple[int, float]]:
        """Best cosine per stored deer by a sequential scan (no index); ``side`` as in ``query``."""
        self.cur.execute(
            "SELECT s.deer_id, min(e.vector <=> %(q)b) FROM sightings s JOIN embeddings e "
            "ON e.detection_id = s.detection_id AND e.embedding_version = %(v)s"
            + _OTHER_FLANK_OUT.format(id="s.detection_id") + " GROUP BY s.deer_id",
            {"q": np.asarray(vector, np.float32), "v": self.version, "other": other_flank(side)})
        return [(d, 1.0 - float(dist)) for d, dist in self.cur.fetchall()]


def nearest_sightings_sql(version: str):
    """The HNSW look-up of ``NearestSightings.query`` with ``version`` as a literal (parameters
    ``q`` (float32 vector, binary), ``ef``, ``other`` (the flank left out, or NULL))."""
    from psycopg import sql

    return sql.SQL(
        "WITH nn AS MATERIALIZED (SELECT detection_id, vector <=> %(q)b AS dist FROM embeddings "
        "  WHERE embedding_version = {v} ORDER BY vector <=> %(q)b LIMIT %(ef)s) "
        "SELECT s.detection_id, s.deer_id, nn.dist FROM nn JOIN sightings s ON s.detection_id = nn.detection_id"
        + _OTHER_FLANK_OUT.format(id="nn.detection_id")).format(v=sql.Literal(version))


# Flank-aware look-ups: no sighting whose known flank is the other one (NULL side: compared).
_OTHER_FLANK_OK = ("(CAST(%(other)s AS text) IS NULL OR NOT EXISTS (SELECT 1 FROM detections fd "
                   "WHERE fd.detection_id = {id} AND fd.side = CAST(%(other)s AS text)))")
_OTHER_FLANK_OUT = " WHERE " + _OTHER_FLANK_OK


def deer_sighting_vectors(conn: sa.Connection, deer_ids: Sequence[int], version: str, side: str | None = None,
                          exclude: str | None = None) -> list[tuple[str, int, np.ndarray]]:
    """(detection_id, deer_id, vector of ``version``) of every decided sighting of these deer;
    ``side`` (left | right): sightings of the other flank are left out (as ``NearestSightings``);
    ``exclude``: one detection left out (the photo being looked up)."""
    cur = vector_cursor(conn)
    cur.execute(
        "SELECT s.detection_id, s.deer_id, e.vector FROM sightings s JOIN embeddings e "
        "ON e.detection_id = s.detection_id AND e.embedding_version = %(v)s AND e.status = 'ok' "
        "WHERE s.deer_id = ANY(%(ids)s) AND s.detection_id IS DISTINCT FROM %(x)s AND "
        + _OTHER_FLANK_OK.format(id="s.detection_id"),
        {"v": version, "ids": list(deer_ids), "x": exclude, "other": other_flank(side)})
    return cur.fetchall()


def hnsw_nearest_deer(conn: sa.Connection, query: np.ndarray, version: str, ef: int) -> dict[int, float]:
    """deer_id -> best cosine among the stored sightings an ``ef``-wide HNSW scan finds."""
    best: dict[int, float] = {}
    for d, sim in NearestSightings(conn, version).query(query, ef):
        best[d] = max(sim, best.get(d, -np.inf))
    return best


def create_deer(conn: sa.Connection, founders: Mapping[int, tuple[str, str]]) -> dict[int, int]:
    """Insert new deer, keyed by founding detection; provisional id -> deer_id.

    A deer withdrawn for replay that is founded again by the same detection keeps its id."""
    if not founders:
        return {}
    prov = list(founders)
    rows = conn.execute(sa.text(
        "INSERT INTO deer (founding_detection_id, sex) "
        "SELECT * FROM unnest(CAST(:f AS text[]), CAST(:s AS text[])) "
        "ON CONFLICT (founding_detection_id) DO UPDATE SET sex = EXCLUDED.sex "
        "RETURNING founding_detection_id, deer_id"),
        {"f": [founders[p][0] for p in prov], "s": [founders[p][1] for p in prov]}).all()
    by_founder = {r.founding_detection_id: r.deer_id for r in rows}
    return {p: by_founder[founders[p][0]] for p in prov}


SIGHTING_COLUMNS = ("detection_id", "deer_id", "encounter_key", "partition_key", "decision",
                    "score", "threshold", "embedding_version", "captured_at")


SCORE_COLUMNS = ("detection_id", "encounter_key", "candidate_deer_id", "similarity", "component_models",
                 "component_scores", "sex_match", "matched", "threshold", "embedding_version", "partition_key")

# The per-model cosines of a score row as {model: cosine} (rows of any age), for SELECT lists.
COMPONENTS_SQL = "score_components(component_models, component_scores, components)"


@dataclass
class ScoreBlock:
    """The scores of one encounter's detections against its candidate deer, as arrays: one row
    per (detection, candidate) whose score is finite (a NaN/-inf score: not compared)."""

    detection_ids: Sequence[str]
    encounter_key: str
    partition_keys: Sequence[str]        # per detection
    candidates: np.ndarray               # candidate deer ids (int64)
    sims: np.ndarray                     # detections x candidates, float64
    comps: np.ndarray                    # detections x candidates x components
    sex_match: np.ndarray                # per candidate (bool)
    chosen: int                          # the deer the encounter went to
    threshold: float


def score_arrays(blocks: Sequence[ScoreBlock], rename: Mapping[int, int] | None = None) -> dict:
    """The rows of ``blocks`` as column arrays (``rename``: provisional deer id -> real id):
    ``det`` (row -> index into ``detection_ids``), ``cand``, ``sim``, ``comps``, ``sex_match``,
    ``matched``, and per detection ``detection_ids``, ``encounter_keys``, ``partition_keys``,
    ``thresholds``."""
    det_ids, enc_keys, part_keys, thresholds = [], [], [], []
    dets, cands, sims, comps, sexm, matched = [], [], [], [], [], []
    n_comp = 0
    for b in blocks:
        base = len(det_ids)
        det_ids += b.detection_ids
        enc_keys += [b.encounter_key] * len(b.detection_ids)
        part_keys += b.partition_keys
        thresholds += [b.threshold] * len(b.detection_ids)
        if not len(b.candidates):
            continue
        ok = np.isfinite(b.sims)
        i, j = np.nonzero(ok)
        dets.append(base + i)
        cands.append(b.candidates[j])
        sims.append(b.sims[i, j])
        comps.append(b.comps[i, j])
        n_comp = b.comps.shape[-1]
        sexm.append(b.sex_match[j])
        matched.append(b.candidates[j] == b.chosen)
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt)) if dets else (lambda xs, dt: np.zeros(0, dt))
    out = {"det": cat(dets, np.int64), "cand": cat(cands, np.int64), "sim": cat(sims, np.float64),
           "comps": np.concatenate(comps).astype(np.float64) if dets else np.zeros((0, n_comp)),
           "sex_match": cat(sexm, bool), "matched": cat(matched, bool), "detection_ids": det_ids,
           "encounter_keys": enc_keys, "partition_keys": part_keys, "thresholds": thresholds}
    if rename and len(out["cand"]):
        prov = out["cand"] < 0
        if prov.any():
            out["cand"][prov] = [rename.get(c, c) for c in out["cand"][prov].tolist()]
    return out


def copy_scores(conn: sa.Connection, rows: Mapping, models: Sequence[str], version: str) -> int:
    """Write similarity score rows (the column arrays of :func:`score_arrays`) with one binary
    COPY; the fixed-width middle of every row is built by numpy, the texts once per detection."""
    n = len(rows["cand"])
    if not n:
        return 0
    i4, h = struct.Struct(">i").pack, struct.pack

    def text(v: str) -> bytes:
        e = v.encode()
        return i4(len(e)) + e

    names = [m.encode() for m in models]
    nm = len(names)
    # text[]: ndim 1, no nulls, element oid 25, length, lower bound 1, then (length, bytes) each
    models_b = h(">iiiii", 1, 0, 25, nm, 1) + b"".join(i4(len(x)) + x for x in names)
    arr_head = h(">iiiii", 1, 0, 700, nm, 1)
    dtype = np.dtype([("l_c", ">i4"), ("c", ">i8"), ("l_s", ">i4"), ("s", ">f4"),
                      ("l_models", ">i4"), ("models", f"S{len(models_b)}"), ("l_arr", ">i4"),
                      ("arr_head", f"S{len(arr_head)}"), ("comp", [("l", ">i4"), ("v", ">f4")], (nm,)),
                      ("l_sm", ">i4"), ("sm", "i1"), ("l_m", ">i4"), ("m", "i1")])
    rec = np.zeros(n, dtype)
    rec["l_c"], rec["c"], rec["l_s"], rec["s"] = 8, rows["cand"], 4, rows["sim"]
    rec["l_models"], rec["models"] = len(models_b), models_b
    rec["l_arr"], rec["arr_head"] = len(arr_head) + 8 * nm, arr_head
    rec["comp"]["l"], rec["comp"]["v"] = 4, rows["comps"]
    rec["l_sm"], rec["sm"], rec["l_m"], rec["m"] = 1, rows["sex_match"], 1, rows["matched"]
    mid, sz = rec.tobytes(), dtype.itemsize
    n_fields, vkey = h(">h", 11), text(version)
    heads = [n_fields + text(d) + text(e) for d, e in zip(rows["detection_ids"], rows["encounter_keys"])]
    tails = [h(">if", 4, t) + vkey + text(p) for t, p in zip(rows["thresholds"], rows["partition_keys"])]
    out = [b"PGCOPY\n\xff\r\n\x00" + h(">ii", 0, 0)]
    out += [heads[d] + mid[i * sz:(i + 1) * sz] + tails[d] for i, d in enumerate(rows["det"].tolist())]
    out.append(h(">h", -1))
    raw = conn.connection.driver_connection
    with raw.cursor() as cur, cur.copy(f"COPY similarity_scores ({', '.join(SCORE_COLUMNS)}) "
                                       "FROM STDIN (FORMAT BINARY)") as cp:
        cp.write(b"".join(out))
    return n


def copy_rows(conn: sa.Connection, table: str, columns: Sequence[str], rows: Iterable[Sequence]) -> int:
    """COPY rows into a table inside the current transaction."""
    raw = conn.connection.driver_connection
    n = 0
    with raw.cursor() as cur:
        with cur.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as cp:
            for row in rows:
                cp.write_row(row)
                n += 1
    return n


def finish_deer(conn: sa.Connection, affected: Iterable[int], versions: Sequence[str], gallery=None) -> int:
    """Bring affected deer up to date (sex, first/last seen, sighting count, profile vectors)
    and delete those left with no sightings. Returns how many were deleted. With ``gallery``
    (the whole gallery in memory, current) the profile vectors are taken from it and written
    with one COPY; otherwise they are averaged in SQL."""
    ids = sorted(set(int(a) for a in affected))
    if not ids:
        return 0
    conn.execute(sa.text(
        "UPDATE deer k SET sighting_count = x.n, first_seen = x.f, last_seen = x.l, "
        "  sex = CASE WHEN x.fem > x.mal THEN 'female' WHEN x.mal > x.fem THEN 'male' "
        "             ELSE 'unknown' END "
        "FROM (SELECT s.deer_id, count(*) n, min(s.captured_at) f, max(s.captured_at) l, "
        "        count(*) FILTER (WHERE d.sex = 'female') fem, "
        "        count(*) FILTER (WHERE d.sex = 'male') mal "
        "      FROM sightings s JOIN detections d ON d.detection_id = s.detection_id "
        "      WHERE s.deer_id = ANY(:ids) GROUP BY s.deer_id) x "
        "WHERE k.deer_id = x.deer_id"), {"ids": ids})
    deleted = conn.execute(sa.text(
        "DELETE FROM deer k WHERE k.deer_id = ANY(:ids) AND NOT EXISTS "
        "(SELECT 1 FROM sightings s WHERE s.deer_id = k.deer_id) RETURNING deer_id"), {"ids": ids}).all()
    if gallery is not None:
        write_profiles(conn, ids, *gallery.exact_profiles(ids), versions)   # removed deer: none written
        return len(deleted)
    conn.execute(sa.text("DELETE FROM deer_profile_vectors WHERE deer_id = ANY(:ids)"), {"ids": ids})
    cur = vector_cursor(conn)
    cur.execute("SELECT s.deer_id, e.embedding_version, avg(e.vector), count(*) FROM sightings s "
                "JOIN embeddings e ON e.detection_id = s.detection_id AND e.status = 'ok' "
                "AND e.embedding_version = ANY(%s) WHERE s.deer_id = ANY(%s) GROUP BY 1, 2",
                (list(versions), ids))
    rows = []
    for deer_id, version, mean, n in cur.fetchall():
        norm = float(np.linalg.norm(mean))
        rows.append((deer_id, version, mean / norm if norm > 0 else mean, n))
    if rows:
        cur.executemany("INSERT INTO deer_profile_vectors (deer_id, embedding_version, vector, n_sightings) "
                        "VALUES (%s, %s, %b, %s)", rows)
    return len(deleted)


def deer_total(conn: sa.Connection) -> int:
    return conn.execute(sa.text("SELECT count(*) FROM deer")).scalar_one()


def partition_scores(conn: sa.Connection, partition_key: str):
    import pandas as pd

    return pd.read_sql(sa.text(
        f"SELECT detection_id, encounter_key, candidate_deer_id, similarity, {COMPONENTS_SQL} AS components, sex_match, "
        "matched, threshold, embedding_version FROM similarity_scores WHERE partition_key = :p"),
        conn, params={"p": partition_key})


def partition_decisions(conn: sa.Connection, partition_key: str) -> dict:
    r = conn.execute(sa.text(
        "SELECT count(*) n, count(*) FILTER (WHERE decision = 'matched') matched, "
        "count(*) FILTER (WHERE decision = 'new') new, count(DISTINCT embedding_version) n_versions, "
        "max(score) max_score, min(threshold) min_threshold, max(threshold) max_threshold "
        "FROM sightings WHERE partition_key = :p"), {"p": partition_key}).one()
    return dict(r._mapping)


def as_date(day: str | date) -> date:
    return day if isinstance(day, date) else date.fromisoformat(str(day))



# --------------------------------------------------------------------------------------------
# The in-memory gallery: its generation, a binary read of every decided sighting's vectors,
# profile vectors written with COPY (see gallery.py and gallery_cache.py)
# --------------------------------------------------------------------------------------------

def lock_gallery_generation(conn: sa.Connection) -> tuple[str, int]:
    """(epoch, generation) of the stored gallery, locking the counter until the transaction
    ends: any other writer of sightings waits (its triggers bump the counter), so what this
    transaction reads stays the gallery of this generation."""
    conn.execute(sa.text("INSERT INTO gallery_generation (id) VALUES (1) ON CONFLICT DO NOTHING"))
    r = conn.execute(sa.text("SELECT epoch::text, generation FROM gallery_generation WHERE id = 1 "
                             "FOR UPDATE")).one()
    return (r[0], int(r[1]))


def gallery_generation(conn: sa.Connection) -> tuple[str, int] | None:
    r = conn.execute(sa.text("SELECT epoch::text, generation FROM gallery_generation WHERE id = 1")).first()
    return None if r is None else (r[0], int(r[1]))


SEX_SQL = "CASE d.sex WHEN 'female' THEN 1 WHEN 'male' THEN 2 ELSE 0 END::int2"
SIDE_SQL = ("CASE d.side " + " ".join(f"WHEN '{s}' THEN {c}" for s, c in SIDE_CODE.items())
            + " ELSE 0 END::int2")                    # flanks.SIDE_CODE
_COPY_HEADER = 19           # PGCOPY signature (11), flags (4), header extension length (4)


def _row_dtype(n_vectors: int, dim: int, id_bytes: int) -> np.dtype:
    """One binary COPY row of (deer_id bigint, sex int2, flank int2, detection id as bytea of a
    fixed width, vector x n_vectors), big-endian."""
    f = [("nf", ">i2"), ("l_deer", ">i4"), ("deer", ">i8"), ("l_sex", ">i4"), ("sex", ">i2"),
         ("l_side", ">i4"), ("side", ">i2"), ("l_id", ">i4"), ("id", f"S{id_bytes}")]
    for i in range(n_vectors):
        f += [(f"l{i}", ">i4"), (f"dim{i}", ">i2"), (f"u{i}", ">i2"), (f"v{i}", ">f4", (dim,))]
    return np.dtype(f)


def load_gallery(conn: sa.Connection, versions: Sequence[str], gallery, headroom: int = 0) -> None:
    """Read every decided sighting (deer, sex, flank, detection id, one vector per version) into
    ``gallery`` (an empty ``gallery.Gallery``) with one binary COPY parsed by numpy straight into
    the preallocated matrix (no per-row Python, no sort in the server: the detection id travels
    as a zero-padded bytea of one width, so every row has the same size). ``MatchingError`` when
    a sighting lacks a vector of a version (see ``check_gallery_vectors``)."""
    n, width = conn.execute(sa.text(
        "SELECT count(*), coalesce(max(octet_length(detection_id)), 1) FROM sightings")).one()
    if n == 0:
        return
    raw = conn.connection.driver_connection
    joins = " ".join(
        f"JOIN embeddings e{i} ON e{i}.detection_id = s.detection_id AND e{i}.embedding_version = "
        f"{sql_literal(v)} AND e{i}.status = 'ok' AND e{i}.vector IS NOT NULL" for i, v in enumerate(versions))
    cols = ", ".join(f"e{i}.vector" for i in range(len(versions)))
    padded_id = f"decode(rpad(encode(convert_to(s.detection_id, 'UTF8'), 'hex'), {2 * width}, '0'), 'hex')"
    sql = (f"COPY (SELECT s.deer_id, {SEX_SQL}, {SIDE_SQL}, {padded_id}, {cols} FROM sightings s "
           f"JOIN detections d ON d.detection_id = s.detection_id {joins}) TO STDOUT (FORMAT BINARY)")
    got, dtype, buf, ids = 0, None, bytearray(), []
    at_vec = 30 + width                      # byte offset of the first vector's length in a row
    with raw.cursor() as cur, cur.copy(sql) as cp:
        skip = _COPY_HEADER
        for chunk in cp:
            buf += chunk
            if skip:
                if len(buf) < skip:
                    continue
                del buf[:skip]
                skip = 0
            if dtype is None:
                if len(buf) < at_vec + 4:
                    continue
                dim = (int.from_bytes(buf[at_vec:at_vec + 4], "big", signed=True) - 4) // 4
                dtype = _row_dtype(len(versions), dim, width)
                gallery.reserve(n + headroom, dim)
            k = min(len(buf) // dtype.itemsize, n - got)
            if k:
                rec = np.frombuffer(buf, dtype=dtype, count=k)
                gallery.vec[got: got + k] = np.hstack([rec[f"v{i}"] for i in range(len(versions))])
                gallery.deer[got: got + k] = rec["deer"]
                gallery.sex[got: got + k] = rec["sex"]
                gallery.side[got: got + k] = rec["side"]
                ids += [b.decode() for b in rec["id"].tolist()]      # numpy drops the zero padding
                del rec
                del buf[: k * dtype.itemsize]
                got += k
    if got != n:
        check_gallery_vectors(conn, versions)
        raise MatchingError(f"the gallery has {n} sightings but {got} rows with every version's vector")
    gallery.detection_ids = ids
    gallery.n = n
    gallery.reindex()


def sql_literal(value: str) -> str:
    """A quoted SQL string literal (standard_conforming_strings: quotes doubled), for a value
    the planner must see as a constant (an embedding version matching a partial index)."""
    return "'" + str(value).replace("'", "''") + "'"


def write_profiles(conn: sa.Connection, replaced: Sequence[int], deer_ids: np.ndarray, profiles: np.ndarray,
                   counts: np.ndarray, versions: Sequence[str]) -> int:
    """Replace the profile vectors of the deer ``replaced`` by these (one unit mean per deer and
    version, computed from the in-memory gallery), written with one binary COPY."""
    conn.execute(sa.text("DELETE FROM deer_profile_vectors WHERE deer_id = ANY(:ids)"),
                 {"ids": [int(d) for d in replaced]})
    ids = [int(d) for d in deer_ids]
    if not ids:
        return 0
    dim = profiles.shape[1] // len(versions)
    raw = conn.connection.driver_connection
    out = bytearray(b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0))
    vhead = struct.pack(">ihh", 4 + 4 * dim, dim, 0)
    vbytes = [[p[i * dim:(i + 1) * dim].astype(">f4").tobytes() for i in range(len(versions))]
              for p in profiles]
    vers_b = [v.encode() for v in versions]
    for d, vb, c in zip(ids, vbytes, counts.tolist()):
        for i, v in enumerate(vers_b):
            out += struct.pack(">hiqi", 4, 8, d, len(v)) + v + vhead + vb[i] + struct.pack(">ii", 4, c)
    out += struct.pack(">h", -1)
    with raw.cursor() as cur, cur.copy("COPY deer_profile_vectors (deer_id, embedding_version, vector, "
                                       "n_sightings) FROM STDIN (FORMAT BINARY)") as cp:
        cp.write(bytes(out))
    return len(ids) * len(versions)
