import json
from datetime import timedelta

import sqlalchemy as sa

from deer_pipeline import cli
from deer_pipeline.identity import health
from deer_pipeline.identity.matching import decide_partition
from deer_pipeline.ops import status
from deer_pipeline.settings import MatchingSettings
from deer_pipeline_tests.identity.test_matching import MODELS, T0, SyntheticWorld


def _world(engine):
    w = SyntheticWorld(engine)
    ids = []
    for i, (ident, cls) in enumerate([("A", "doe"), ("B", "mid_buck"), ("A", "unknown"), ("C", "fawn"),
                                      ("B", "unknown"), ("D", "doe")]):
        ids.append(w.sighting("cam1", T0 + timedelta(minutes=i), ident, cls=cls))
    w.sighting("cam1", T0 + timedelta(minutes=30), "A", embed=False)              # crop, no vector
    no_crop = w.sighting("cam1", T0 + timedelta(minutes=31), "A", embed=False)
    w.sighting("cam1", T0 + timedelta(minutes=32), "A",
               versions={"multiscale": MODELS["multiscale"]})                      # one model only
    rejected = w.sighting("cam1", T0 + timedelta(minutes=33), "E", embed=False)
    with engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM crops WHERE detection_id = :d"), {"d": no_crop})
        conn.execute(sa.text("DELETE FROM crops WHERE detection_id = :d"), {"d": rejected})
        conn.execute(sa.text("UPDATE detections SET status = 'rejected', reason = 'low confidence' "
                             "WHERE detection_id = :d"), {"d": rejected})
        health.record_check(conn, "matches_happen", "cam1|2024-05-01", True, "ERROR", {"description": "ok"})
        health.record_check(conn, "matches_happen", "cam1|2024-05-01", False, "ERROR", {"description": "bad"})
    w.truth_to_db(ids)
    decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="exact"))
    return w


def test_status_counts_are_consistent(engine):
    _world(engine)
    s = status.collect(engine)
    assert s["detections"] == {"total": 10, "ok": 9, "by_status": {"ok": 9, "rejected": 1}}
    assert s["crops"]["ok"] == 8
    assert s["embedded"]["detections"] == 7
    assert s["embedded"]["per_version"] == {MODELS["multiscale"]: 7, MODELS["efficientnet_b0"]: 6}
    assert s["assigned"] == 6 and s["unassigned_ok_detections"] == 3
    # the chain of inequalities the pipeline guarantees
    assert s["assigned"] <= s["embedded"]["detections"] <= s["crops"]["ok"] <= s["detections"]["ok"]
    assert sum(s["deer"]["by_sex"].values()) == s["deer"]["total"] == 4
    assert s["deer"]["by_sex"] == {"female": 2, "male": 1, "unknown": 1}
    assert s["decisions"] == {"matched": 2, "new": 4}
    assert s["assignment_rate"] == 2 / 6
    assert abs(s["threshold"]["in_use"] - 0.6) < 1e-6
    assert sorted(v["embedding_version"] for v in s["embedding_versions"]) == sorted(MODELS.values())
    assert list(s["decision_versions"].values()) == [6]
    last = {c["check_name"]: c for c in s["checks"]["last"]}
    assert last["matches_happen"]["passed"] is False and last["matches_happen"]["description"] == "bad"
    assert s["checks"]["failed_last_7_days"] == 1
    assert status.true_identity_count(engine) == 4


def test_status_cli_prints_json_and_a_table(engine, capsys):
    _world(engine)
    assert cli.main(["status", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["assigned"] == 6 and s["deer"]["total"] == 4
    assert cli.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "assignment rate" in out and "FAIL matches_happen" in out


def test_status_on_an_empty_store(engine):
    s = status.collect(engine)
    assert s["assigned"] == 0 and s["deer"]["total"] == 0 and s["assignment_rate"] == 0.0
    assert s["threshold"]["in_use"] is None and s["checks"]["last"] == []
