"""Camtrap DP export of demo-like data: valid against the Camtrap DP 1.0 profile and table
schemas (frictionless, vendored schemas, no network), individualIDs = the deer in the database."""

from __future__ import annotations

import csv
import json
import socket

import pytest
import sqlalchemy as sa

from deer_pipeline.export import camtrap_dp, cameras, records, sightings
from deer_pipeline_tests.export.demo_data import make_demo_like, write_cameras_csv


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a network connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:1]}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_camtrap_dp_export_validates_and_names_the_deer(engine, tmp_path, no_network, capsys):
    info, _ = make_demo_like(engine, tmp_path / "sample", decide_fraction=0.85)
    out = tmp_path / "cdp"
    # cameras without coordinates: a clear error naming them, nothing written
    with pytest.raises(camtrap_dp.ExportError, match="without coordinates: cam-creek, cam-north"):
        camtrap_dp.write_package(engine, out)
    assert not out.exists() or not any(out.iterdir())
    write_cameras_csv(tmp_path / "cameras.csv", info.cameras)
    assert cameras.import_cameras(engine, tmp_path / "cameras.csv").errors == []

    report = camtrap_dp.write_package(engine, out)
    assert sorted(p.name for p in out.iterdir()) == ["datapackage.json", "deployments.csv", "media.csv",
                                                     "observations.csv"]
    errors = camtrap_dp.validate_package(out)
    assert errors == [], "\n".join(errors[:20])

    obs = read_csv(out / "observations.csv")
    media = read_csv(out / "media.csv")
    deps = read_csv(out / "deployments.csv")
    with engine.connect() as conn:
        labels = records.deer_labels(conn)
        stored = dict(conn.execute(sa.text("SELECT detection_id, deer_id FROM sightings")).all())
        n_ok = conn.execute(sa.text("SELECT count(*) FROM detections WHERE status = 'ok'")).scalar_one()
        encounters = dict(conn.execute(sa.text("SELECT detection_id, encounter_id FROM detections")).all())
    assert len(obs) == n_ok == report.observations and len(deps) == 2
    assert {o["observationLevel"] for o in obs} == {"media"}
    # individualIDs are the deer in the database, detection by detection
    assert {o["individualID"] for o in obs if o["individualID"]} == set(labels.values())
    for o in obs:
        if o["observationID"] in stored:
            assert o["individualID"] == labels[stored[o["observationID"]]]
            assert o["classificationMethod"] == "machine"
        else:
            assert o["individualID"] == "" and o["observationComments"] == "not yet identified"
        assert o["eventID"] == encounters[o["observationID"]]
        for k in ("bboxX", "bboxY", "bboxWidth", "bboxHeight"):
            assert 0 <= float(o[k]) <= 1
    matched = [o for o in obs if "decision:matched" in o["observationTags"]]
    assert matched and all(0 <= float(o["classificationProbability"]) <= 1 for o in matched)
    assert all(o["classificationProbability"] == "" for o in obs if "decision:new" in o["observationTags"])
    # labels are stable and readable: deer-<camera>-<day>-<hash>
    assert all(lbl.startswith(("deer-cam-north-2025", "deer-cam-creek-2025")) for lbl in labels.values())
    with engine.connect() as conn:
        assert records.deer_labels(conn) == labels
    assert {m["mediaID"] for m in media} == {o["mediaID"] for o in obs}
    assert all(not m["filePath"].startswith(("/", ".")) for m in media)
    dp = json.loads((out / "datapackage.json").read_text())
    assert dp["profile"] == camtrap_dp.PROFILE_URL and dp["project"]["individualAnimals"] is True
    assert deps[0]["cameraModel"] == "Browning BTC-8E" and deps[0]["deploymentStart"] == "2025-09-28T00:00:00Z"

    # the command: writes, validates offline, says so; refuses the non-empty folder
    from deer_pipeline.export import cli as export_cli

    assert export_cli.main(["camtrap-dp", str(tmp_path / "cli")]) == 0
    assert "valid Camtrap DP 1.0" in capsys.readouterr().out
    assert export_cli.main(["camtrap-dp", str(tmp_path / "cli")]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert export_cli.main(["sightings", str(tmp_path / "s.csv")]) == 0
    assert f"wrote {len(stored)} sightings" in capsys.readouterr().out

    # a deer named in the review app is exported by its name; sightings a person confirmed
    # ('same') are classified by a human
    from deer_pipeline.identity import reviews

    deer_id = stored[obs[0]["observationID"]] if obs[0]["observationID"] in stored else next(iter(stored.values()))
    its = sorted(d for d, k in stored.items() if k == deer_id)
    with engine.begin() as conn:
        reviews.record(conn, "name", its[:1], reviewer="ann", name="Old Notch")
        if len(its) > 2:
            reviews.record(conn, "same", its[1:2], its[2:3], reviewer="ann")
    camtrap_dp.write_package(engine, tmp_path / "named")
    assert camtrap_dp.validate_package(tmp_path / "named") == []
    named = {o["observationID"]: o for o in read_csv(tmp_path / "named" / "observations.csv")}
    assert {named[d]["individualID"] for d in its} == {"Old Notch"}
    assert sum(o["individualID"] == "Old Notch" for o in named.values()) == len(its)
    if len(its) > 2:
        assert named[its[1]]["classificationMethod"] == named[its[2]]["classificationMethod"] == "human"
    assert named[its[0]]["classificationMethod"] == "machine"       # a name is not an identification

    # a non-empty folder is refused, and nothing in it is touched
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(camtrap_dp.ExportError, match="not an empty folder"):
        camtrap_dp.write_package(engine, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_validation_catches_a_broken_package(engine, tmp_path, no_network):
    info, _ = make_demo_like(engine, tmp_path / "sample", n_cameras=1)
    write_cameras_csv(tmp_path / "cameras.csv", info.cameras)
    cameras.import_cameras(engine, tmp_path / "cameras.csv")
    out = tmp_path / "cdp"
    camtrap_dp.write_package(engine, out)
    obs = (out / "observations.csv").read_text().splitlines()
    header = obs[0].split(",")
    cells = obs[1].split(",")
    cells[header.index("observationLevel")] = "frame"           # not in the enum
    (out / "observations.csv").write_text("\n".join([obs[0], ",".join(cells), *obs[2:]]) + "\n")
    dp = json.loads((out / "datapackage.json").read_text())
    del dp["project"]
    (out / "datapackage.json").write_text(json.dumps(dp))
    errors = camtrap_dp.validate_package(out)
    assert any("'project' is a required property" in e for e in errors)
    assert any(e.startswith("observations:") and "frame" in e for e in errors), errors


def test_cameras_import_reports_bad_rows_and_keeps_the_good(engine, tmp_path):
    path = tmp_path / "cameras.csv"
    write_cameras_csv(path, ["cam-a", "cam-b"], bad_rows=(
        "cam-c,91.5,-72.1,2025-09-01,2025-10-01,,\n"
        "cam-d,44.1,-72.1,2025-13-01,2025-10-01,,\n"
        "cam-e,44.1,-72.1,2025-10-05,2025-10-01,,\n"
        "cam|f,44.1,-72.1,,,,\n"
        "cam-g,north,-72.1,,,,\n"
        "cam-a,44.0,-72.0,,,,\n"))
    report = cameras.import_cameras(engine, path)
    assert report.imported == ["cam-a", "cam-b"]
    msgs = dict(report.errors)
    assert "latitude '91.5' is outside -90..90" in msgs[4]
    assert "deployment_start '2025-13-01' is not a date" in msgs[5]
    assert "is before deployment_start" in msgs[6]
    assert "camera_id 'cam|f' is not usable" in msgs[7]
    assert "latitude 'north' is not a number" in msgs[8]
    assert "already given on line 2" in msgs[9]
    with engine.connect() as conn:
        got = {r.camera_id: r for r in conn.execute(sa.text("SELECT * FROM cameras"))}
    assert set(got) == {"cam-a", "cam-b"} and got["cam-a"].latitude == pytest.approx(44.5)
    assert cameras.main(["import", str(path)]) == 1               # bad rows: exit status says so


def test_sightings_csv(engine, tmp_path):
    make_demo_like(engine, tmp_path / "sample", n_cameras=1)
    out = tmp_path / "s.csv"
    n = sightings.write_sightings(engine, out)
    rows = read_csv(out)
    with engine.connect() as conn:
        labels = records.deer_labels(conn)
        assert n == len(rows) == conn.execute(sa.text("SELECT count(*) FROM sightings")).scalar_one()
    assert {r["deer"] for r in rows} == set(labels.values())
    assert all(0 <= float(r["bbox_w_norm"]) <= 1 and r["camera_id"] and r["captured_at"] for r in rows)
    with pytest.raises(FileExistsError):
        sightings.write_sightings(engine, out)
