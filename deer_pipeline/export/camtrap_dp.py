"""Camtrap DP 1.0 (https://camtrap-dp.tdwg.org): the deer, their sightings, photos and cameras as
a Camera Trap Data Package that Camtrap DP tools, Agouti, Wildlife Insights and GBIF read.

``write_package(engine, out_dir)`` writes ``datapackage.json``, ``deployments.csv``,
``media.csv`` and ``observations.csv``:

* one deployment per camera (``deploymentID`` = camera id); coordinates and deployment dates
  come from ``deer-pipeline cameras import`` (a camera with photos but no coordinates stops the
  export with a message naming it; dates not imported are the first and last photo);
* one media row per photo with a good detection (``filePath`` relative to the photos' common
  folder, or to ``media_root``);
* one observation per good detection, ``observationLevel`` = media: ``eventID`` = the encounter
  (burst), ``individualID`` = the deer's name when reviewed, else its stable founding label,
  normalised boxes, ``classificationMethod`` machine (or human for reviewed decisions),
  ``classificationProbability`` = the score of the decision that matched it to the deer (a
  sighting that founded a new deer has no probability; its comment gives the best score it had).

``validate_package(out_dir)`` checks the result against the Camtrap DP 1.0 profile and table
schemas vendored in ``schemas/camtrap-dp-1.0`` with the ``frictionless`` library, with no network.
"""

from __future__ import annotations

import copy
import csv
import json
import mimetypes
import os
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline.export import records
from deer_pipeline.settings import CAMTRAP_DP_DEFAULTS

SCHEMA_DIR = Path(__file__).resolve().parent / "schemas" / "camtrap-dp-1.0"
VERSION = "1.0"
BASE_URL = f"https://raw.githubusercontent.com/tdwg/camtrap-dp/{VERSION}"
PROFILE_URL = f"{BASE_URL}/camtrap-dp-profile.json"
TABLES = ("deployments", "media", "observations")
LIFE_STAGE = {"fawn": "juvenile", "young_buck": "subadult", "doe": "adult", "mid_buck": "adult",
              "mature_buck": "adult", "buck": "adult"}
# Remote "$ref"s of the profile, resolved offline (see schemas/camtrap-dp-1.0/README.md).
LOCAL_REFS = {
    "https://frictionlessdata.io/schemas/data-package.json": SCHEMA_DIR / "data-package.json",
}


class ExportError(ValueError):
    """The export cannot be written (non-empty folder, cameras without coordinates, ...)."""


@dataclass
class ExportReport:
    out_dir: Path
    deployments: int = 0
    media: int = 0
    observations: int = 0
    identified: int = 0
    individuals: int = 0
    files: dict[str, Path] = field(default_factory=dict)

    def summary(self) -> str:
        return (f"Camtrap DP {VERSION} package in {self.out_dir}\n"
                f"  deployments   {self.deployments}\n  media         {self.media}\n"
                f"  observations  {self.observations} ({self.identified} with an individualID, "
                f"{self.individuals} deer)")


def _ts(dt: datetime | None) -> str:
    return "" if dt is None else dt.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _num(v: float | None, digits: int = 6) -> str:
    return "" if v is None else f"{round(float(v), digits):.{digits}f}".rstrip("0").rstrip(".")


def _clip01(v: float, low: float = 0.0) -> float:
    return min(1.0, max(low, v))


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} is not an empty folder; choose a new or empty one "
                          "(an export never overwrites files)")


def _media_path(path: str, root: str) -> str:
    rel = os.path.relpath(path, root)
    if rel.startswith("..") or os.path.isabs(rel):
        raise ExportError(f"photo {path} is outside the media root {root}")
    return rel.replace(os.sep, "/")


def write_package(engine: Engine, out_dir, media_root: str | None = None, title: str | None = None,
                  contributor: str | None = None, data_license: str | None = None,
                  media_license: str | None = None, now: datetime | None = None) -> ExportReport:
    """Write the Camtrap DP package into ``out_dir`` (new or empty); returns what was written."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    d = CAMTRAP_DP_DEFAULTS
    now = now or datetime.now(timezone.utc)
    with engine.connect() as conn:
        labels = records.deer_labels(conn)
        confirmed = records.human_confirmed_ids(conn)
        dets = records.detection_rows(conn)
        cams = {r.camera_id: r for r in conn.execute(sa.text(
            "SELECT camera_id, latitude, longitude, deployment_start, deployment_end, camera_model, notes "
            "FROM cameras"))}
    if not dets:
        raise ExportError("nothing to export: no good detections in the database")
    used = sorted({r["camera_id"] for r in dets})
    missing = [c for c in used if cams.get(c) is None or cams[c].latitude is None]
    if missing:
        raise ExportError(f"camera(s) without coordinates: {', '.join(missing)}. Camtrap DP needs the "
                          "latitude and longitude of every deployment: run `deer-pipeline cameras import "
                          "cameras.csv` (camera_id,latitude,longitude,deployment_start,deployment_end,...)")
    paths = sorted({r["path"] for r in dets})
    root = os.path.abspath(media_root) if media_root else os.path.commonpath([os.path.dirname(p) for p in paths])

    # deployments
    first_last: dict[str, list[datetime]] = {}
    for r in dets:
        fl = first_last.setdefault(r["camera_id"], [r["captured_at"], r["captured_at"]])
        fl[0], fl[1] = min(fl[0], r["captured_at"]), max(fl[1], r["captured_at"])
    deployments = []
    for c in used:
        cam = cams[c]
        start = cam.deployment_start or first_last[c][0]
        end = cam.deployment_end or first_last[c][1]
        comments = [cam.notes] if cam.notes else []
        if cam.deployment_start is None or cam.deployment_end is None:
            comments.append("deployment dates not imported: first/last photo used")
        if first_last[c][0] < start or first_last[c][1] > end:
            comments.append("some photos fall outside the imported deployment dates")
        deployments.append({
            "deploymentID": c, "locationID": c, "locationName": c,
            "latitude": _num(cam.latitude), "longitude": _num(cam.longitude),
            "deploymentStart": _ts(start), "deploymentEnd": _ts(end), "cameraID": c,
            "cameraModel": cam.camera_model or "", "deploymentComments": "; ".join(comments)})

    # media
    media, seen_images = [], set()
    for r in dets:
        if r["image_id"] in seen_images:
            continue
        seen_images.add(r["image_id"])
        media.append({
            "mediaID": str(r["image_id"]), "deploymentID": r["camera_id"], "captureMethod": "activityDetection",
            "timestamp": _ts(r["captured_at"]), "filePath": _media_path(r["path"], root), "filePublic": "false",
            "fileName": os.path.basename(r["path"]),
            "fileMediatype": mimetypes.guess_type(r["path"])[0] or "image/jpeg"})

    # observations
    observations, individuals = [], set()
    identified = 0
    for r in dets:
        w, h = r["width"], r["height"]
        box = {}
        if w and h and r["bbox_w"] and r["bbox_h"]:
            x, y = _clip01(r["bbox_x"] / w), _clip01(r["bbox_y"] / h)
            box = {"bboxX": _num(x, 4), "bboxY": _num(y, 4),
                   "bboxWidth": _num(max(1e-4, min(1 - x, r["bbox_w"] / w)), 4),
                   "bboxHeight": _num(max(1e-4, min(1 - y, r["bbox_h"] / h)), 4)}
        row = {"observationID": r["detection_id"], "deploymentID": r["camera_id"], "mediaID": str(r["image_id"]),
               "eventID": r["encounter_id"] or "", "eventStart": _ts(r["captured_at"]),
               "eventEnd": _ts(r["captured_at"]), "observationLevel": "media", "observationType": "animal",
               "scientificName": d["scientific_name"], "count": "1",
               "lifeStage": LIFE_STAGE.get(r["classification"] or "", ""),
               "sex": r["sex"] if r["sex"] in ("female", "male") else "",
               "individualID": "", "bboxX": "", "bboxY": "", "bboxWidth": "", "bboxHeight": "",
               "classificationMethod": "", "classifiedBy": "", "classificationTimestamp": "",
               "classificationProbability": "", "observationTags": "", "observationComments": ""}
        row.update(box)
        tags = [f"classification:{r['classification']}"] if r["classification"] else []
        if r["confidence"] is not None:
            tags.append(f"detectorConfidence:{r['confidence']:.3f}")
        if r["deer_id"] is not None:
            identified += 1
            label = labels.get(int(r["deer_id"]), f"deer-{r['deer_id']}")
            individuals.add(label)
            human = records.is_human_decision(r["decision"], r["detection_id"], confirmed)
            row.update({
                "individualID": label, "classificationMethod": "human" if human else "machine",
                "classifiedBy": "reviewer (deer-pipeline review)" if human
                else f"deer_pipeline re-identification ({r['embedding_version']})",
                "classificationTimestamp": _ts(r["decided_at"])})
            if r["decision"] == "new":
                if r["score"] is None:
                    row["observationComments"] = "founded a new deer (no known deer to compare with)"
                else:
                    under = f" under the threshold {r['threshold']:.2f}" if r["threshold"] is not None else ""
                    row["observationComments"] = (f"founded a new deer (best score to a known deer "
                                                  f"{float(r['score']):.3f}{under})")
            elif r["score"] is not None:
                row["classificationProbability"] = _num(_clip01(float(r["score"])), 4)
            tags.append(f"decision:{r['decision']}")
        else:
            row["observationComments"] = "not yet identified"
        row["observationTags"] = " | ".join(tags)
        observations.append(row)

    out_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, rows_ in (("deployments", deployments), ("media", media), ("observations", observations)):
        fields = [f["name"] for f in load_schema(name)["fields"]]
        path = out_dir / f"{name}.csv"
        with open(path, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="raise")
            writer.writeheader()
            for row in rows_:
                writer.writerow({k: row.get(k, "") for k in fields})
        files[name] = path

    lats = [float(cams[c].latitude) for c in used]
    lons = [float(cams[c].longitude) for c in used]
    if len(used) == 1:
        spatial = {"type": "Point", "coordinates": [lons[0], lats[0]]}
    else:
        w_, e_, s_, n_ = min(lons), max(lons), min(lats), max(lats)
        if w_ == e_ or s_ == n_:
            w_, e_, s_, n_ = w_ - 1e-4, e_ + 1e-4, s_ - 1e-4, n_ + 1e-4
        spatial = {"type": "Polygon", "bbox": [w_, s_, e_, n_],
                   "coordinates": [[[w_, s_], [e_, s_], [e_, n_], [w_, n_], [w_, s_]]]}
    times = [r["captured_at"] for r in dets]
    descriptor = {
        "profile": PROFILE_URL,
        "name": d["package_name"],
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"deer_pipeline:{','.join(used)}:{_ts(now)}")),
        "created": _ts(now),
        "title": title or d["title"],
        "description": ("Individual deer identified in trail-camera photos by deer_pipeline "
                        "(detections from the upstream detector, identities by re-identification). "
                        f"filePath is relative to {root}."),
        "version": "1.0",
        "contributors": [{"title": contributor or d["contributor"], "role": "contributor"}],
        "sources": [{"title": "deer_pipeline", "version": _pipeline_version()}],
        "licenses": [{"name": data_license or d["data_license"], "scope": "data"},
                     {"name": media_license or d["media_license"], "scope": "media"}],
        "project": {"title": title or d["title"], "samplingDesign": d["sampling_design"],
                    "captureMethod": ["activityDetection"], "individualAnimals": True,
                    "observationLevel": ["media"]},
        "spatial": spatial,
        "temporal": {"start": min(times).astimezone(timezone.utc).date().isoformat(),
                     "end": max(times).astimezone(timezone.utc).date().isoformat()},
        "taxonomic": [{"scientificName": d["scientific_name"], "taxonRank": "species",
                       "kingdom": "Animalia", "class": "Mammalia", "order": "Artiodactyla",
                       "family": "Cervidae", "genus": d["scientific_name"].split(" ")[0],
                       "vernacularNames": {"eng": d["vernacular_name"]}}],
        "resources": [{"name": name, "path": f"{name}.csv", "profile": "tabular-data-resource",
                       "format": "csv", "mediatype": "text/csv", "encoding": "utf-8",
                       "dialect": {"delimiter": ",", "quoteChar": "\"", "header": True},
                       "schema": f"{BASE_URL}/{name}-table-schema.json"} for name in TABLES],
    }
    files["datapackage"] = out_dir / "datapackage.json"
    files["datapackage"].write_text(json.dumps(descriptor, indent=2) + "\n", encoding="utf-8")
    return ExportReport(out_dir=out_dir, deployments=len(deployments), media=len(media),
                        observations=len(observations), identified=identified,
                        individuals=len(individuals), files=files)


def _pipeline_version() -> str:
    try:
        from importlib.metadata import version

        return version("deer_pipeline")
    except Exception:
        return "unknown"


def load_schema(name: str) -> dict:
    return json.loads((SCHEMA_DIR / f"{name}-table-schema.json").read_text(encoding="utf-8"))


def _profile_errors(descriptor: dict) -> list[str]:
    """The descriptor against the Camtrap DP 1.0 profile (JSON Schema), offline: the profile's
    remote references are served from the vendored copies and frictionless's own assets."""
    import jsonschema
    from referencing import Registry, Resource
    from referencing.jsonschema import DRAFT4

    import frictionless

    refs = dict(LOCAL_REFS)
    refs["http://json.schemastore.org/geojson.json"] = (
        Path(frictionless.__file__).resolve().parent / "assets" / "profiles" / "geojson.json")
    registry = Registry().with_resources(
        (uri, Resource.from_contents(json.loads(Path(p).read_text()), default_specification=DRAFT4))
        for uri, p in refs.items())
    # The published 1.0 profile writes its internal reference as "#$defs/version" (no slash), which
    # older JSON Schema libraries accepted and current ones reject; read it as "#/$defs/version".
    text = (SCHEMA_DIR / "camtrap-dp-profile.json").read_text().replace('"#$defs/', '"#/$defs/')
    profile = json.loads(text)
    validator = jsonschema.Draft4Validator(profile, registry=registry)
    return [f"datapackage.json: {e.message} at {'/'.join(map(str, e.absolute_path)) or '(top)'}"
            for e in validator.iter_errors(descriptor)]


def validate_package(out_dir) -> list[str]:
    """Every error of the package in ``out_dir`` against Camtrap DP 1.0 (profile + table schemas,
    types, constraints, primary and foreign keys), checked with frictionless; [] when valid."""
    import frictionless

    out_dir = Path(out_dir).resolve()
    descriptor = json.loads((out_dir / "datapackage.json").read_text(encoding="utf-8"))
    errors = _profile_errors(descriptor)
    local = copy.deepcopy(descriptor)
    local.pop("profile", None)                  # checked above, offline
    for res in local.get("resources", []):
        url = res.get("schema")
        name = res.get("name")
        if name in TABLES:
            if url != f"{BASE_URL}/{name}-table-schema.json":
                errors.append(f"resource {name}: schema {url!r} is not the Camtrap DP {VERSION} table schema")
            res["schema"] = load_schema(name)
    cwd = os.getcwd()
    try:
        os.chdir(out_dir)                       # frictionless reads resources relative to the cwd
        report = frictionless.Package(local, basepath=".").validate()
    finally:
        os.chdir(cwd)
    for err in report.errors:
        errors.append(f"package: {err.message}")
    for task in report.tasks:
        for err in task.errors:
            errors.append(f"{task.name}: {err.message}")
    return errors
