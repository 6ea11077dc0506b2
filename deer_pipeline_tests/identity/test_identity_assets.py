"""The Dagster layer of identity: settings validation, deer_profiles / similarity_scores /
threshold_report through ``dg.materialize``, the checks, the alert sensor and its webhook."""

import json
import threading
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import dagster as dg
import pytest
import sqlalchemy as sa

from deer_pipeline.defs import checks as check_defs
from deer_pipeline.defs.alerts import failed_check_alerts
from deer_pipeline.defs.identity import deer_profiles, similarity_scores
from deer_pipeline.defs.partitions import CAMERA_PARTITIONS_NAME, partition_key
from deer_pipeline.defs.reports import threshold_report
from deer_pipeline.defs.resources import (
    DeerDatabase,
    IdentitySettings,
    InferenceResource,
)
from deer_pipeline.identity import health
from deer_pipeline.identity.matching import decide_partition
from deer_pipeline.ops import alerts
from deer_pipeline.settings import MatchingSettings
from deer_pipeline_tests.identity.test_matching import MODELS, T0, SyntheticWorld, count

CHECKS = check_defs.CHECK_NAMES     # evaluated in deer_profiles' own step


def identity(**kw) -> IdentitySettings:
    return IdentitySettings(embedding_versions=dict(MODELS), search="exact", **kw)


# ---------------------------------------------------------------------------------------------
# settings

@pytest.mark.parametrize("kwargs, message", [
    ({"reid_threshold": 1.5}, "reid_threshold must be a number in [0, 1], got 1.5"),
    ({"reid_threshold": -0.1}, "reid_threshold must be a number in [0, 1]"),
    ({"ensemble_weights": {"multiscale": 0.7, "efficientnet_b0": 0.4}}, "ensemble_weights must sum to 1"),
    ({"thresholds_by_sex": {"stag": 0.5}}, "thresholds_by_sex: unknown sex 'stag'"),
    ({"thresholds_by_sex": {"male": 2}}, "thresholds_by_sex[male] must be a number in [0, 1]"),
    ({"search": "faiss"}, "search must be auto, exact, two_stage or hnsw"),
    ({"coarse_precision": "float16"}, "coarse_precision must be auto, float32 or bfloat16"),
    ({"version_source": "newest"}, "version_source must be one of"),
    ({"embedding_versions": {"multiscale": "x"}}, "no version for ensemble model(s) ['efficientnet_b0']"),
    ({"assignment_rate_min": 0.9, "assignment_rate_max": 0.5}, "must not exceed"),
])
def test_invalid_identity_settings_are_rejected_at_load_with_a_clear_message(kwargs, message):
    with pytest.raises(Exception) as err:
        IdentitySettings(**kwargs)
    assert message in str(err.value)


def test_identity_settings_mirror_matching_settings():
    s = IdentitySettings(reid_threshold=0.7, thresholds_by_sex={"female": 0.75}, sex_filter=False,
                         search="hnsw", coarse_precision="float32").matching_settings()
    assert s == MatchingSettings(reid_threshold=0.7, thresholds_by_sex={"female": 0.75}, sex_filter=False,
                                 search="hnsw", coarse_precision="float32")
    assert IdentitySettings(embedding_versions=dict(MODELS)).versions() == MODELS
    assert IdentitySettings(version_source="latest").versions() is None


# ---------------------------------------------------------------------------------------------
# assets and checks through Dagster

def _materialize(instance, key, ident, selection=None):
    return dg.materialize(
        selection or [deer_profiles, similarity_scores],
        partition_key=key, instance=instance, raise_on_error=False,
        resources={"database": DeerDatabase(), "identity": ident, "inference": InferenceResource()})


def _checks(result) -> dict:
    return {e.check_name: e for e in result.get_asset_check_evaluations()}


def _two_days(w):
    for day in range(2):
        for i, ident in enumerate("ABCABCAB"):
            w.sighting("cam1", T0 + timedelta(days=day, minutes=5 * i), ident)


def test_materialize_deer_profiles_similarity_scores_and_checks(engine):
    w = SyntheticWorld(engine)
    _two_days(w)
    w.sighting("cam1", T0 + timedelta(minutes=59), "A", embed=False)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, ["cam1"])
        r1 = _materialize(instance, partition_key("cam1", "2024-05-01"), identity())
        assert r1.success
        meta = r1.asset_materializations_for_node("deer_profiles")[0].metadata
        assert meta["sightings_decided"].value == 8 and meta["matched"].value == 5
        assert meta["new_deer"].value == 3 and meta["unassigned"].value == 1
        assert meta["assignment_rate"].value == pytest.approx(5 / 8)
        assert meta["threshold"].value == pytest.approx(0.6) and meta["deer_total"].value == 3
        assert meta["embedding_version"].value.startswith("v3_ensemble")
        assert "sightings decided" in meta["summary"].value
        scores_meta = r1.asset_materializations_for_node("similarity_scores")[0].metadata
        assert scores_meta["rows"].value == count(engine, "SELECT count(*) FROM similarity_scores")
        assert "| 0.60 (in use) |" in scores_meta["would_match"].value
        ev = _checks(r1)
        assert set(ev) == set(CHECKS)
        # the checks ran inside the deer_profiles step: no step of their own
        steps = {e.step_key for e in r1.all_events if e.step_key}
        assert steps == {"deer_profiles", "similarity_scores"}, steps
        assert all(e.passed for e in ev.values()), {k: e.description for k, e in ev.items()}
        assert ev["matches_happen"].partition == "cam1|2024-05-01"

        r2 = _materialize(instance, partition_key("cam1", "2024-05-02"), identity())
        assert r2.success and all(e.passed for e in _checks(r2).values())
        meta2 = r2.asset_materializations_for_node("deer_profiles")[0].metadata
        assert meta2["matched"].value == 8 and meta2["deer_total"].value == 3

        # re-materialising the first day replays the second and changes nothing
        before = count(engine, "SELECT count(*) FROM deer")
        r3 = _materialize(instance, partition_key("cam1", "2024-05-01"), identity(), [deer_profiles])
        assert r3.success
        assert r3.asset_materializations_for_node("deer_profiles")[0].metadata["replayed"].value == 8
        assert count(engine, "SELECT count(*) FROM deer") == before

    with engine.connect() as conn:
        rows = conn.execute(sa.text("SELECT check_name, partition_key, passed FROM check_results")).all()
    # every check of every materialisation is recorded: 2 days + the first day again, 6 checks each
    assert len(rows) == 3 * len(CHECKS) and all(r.passed for r in rows)
    assert {r.partition_key for r in rows} == {"cam1|2024-05-01", "cam1|2024-05-02"}


def test_zero_match_check_fires_when_the_threshold_is_above_every_score(engine):
    w = SyntheticWorld(engine)
    _two_days(w)
    too_high = identity(reid_threshold=0.99, min_sightings_for_rate=5)
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(CAMERA_PARTITIONS_NAME, ["cam1"])
        result = _materialize(instance, partition_key("cam1", "2024-05-01"), too_high)
        ev = _checks(result)
        zero = ev["matches_happen"]
        assert not zero.passed and zero.severity == dg.AssetCheckSeverity.ERROR
        assert "threshold is likely too high" in zero.description
        assert zero.metadata["max_similarity"].value < 0.99
        assert zero.metadata["deer_total"].value == 8
        # blocking: the scores summary did not run, and the run failed
        assert not result.success
        assert not result.asset_materializations_for_node("similarity_scores")
        # every sighting founded a deer: the rate checks warn too
        assert not ev["assignment_rate_in_bounds"].passed
        assert ev["assignment_rate_in_bounds"].severity == dg.AssetCheckSeverity.WARN
    with engine.connect() as conn:
        rec = conn.execute(sa.text("SELECT passed, severity, details FROM check_results "
                                   "WHERE check_name = 'matches_happen'")).one()
    assert rec.passed is False and rec.severity == "ERROR" and rec.details["threshold"] == pytest.approx(0.99)


def test_zero_match_check_does_not_fire_for_a_new_herd(engine):
    w = SyntheticWorld(engine)
    for i, ident in enumerate("ABCDEFG"):
        w.sighting("cam1", T0 + timedelta(minutes=i), ident)
    decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="exact"))
    for i, ident in enumerate("ABC"):
        w.sighting("cam1", T0 + timedelta(days=1, minutes=i), ident)
    for i, ident in enumerate("HIJKLM"):
        w.sighting("cam2", T0 + timedelta(days=1, minutes=i), ident)
    decide_partition(engine, "cam1", "2024-05-02", MatchingSettings(search="exact"))
    decide_partition(engine, "cam2", "2024-05-02", MatchingSettings(search="exact"))
    with engine.connect() as conn:
        out = health.check_zero_matches(conn, "cam2", "2024-05-02", min_sightings=5)
    assert out.passed and out.metadata["matched"] == 0 and out.metadata["window_matched_same_threshold"] == 3


def test_merge_candidates_and_embedding_checks(engine):
    w = SyntheticWorld(engine, noise=0.2)
    a1 = w.sighting("cam1", T0, "A")
    w.sighting("cam1", T0 + timedelta(minutes=1), "A")
    w.sighting("cam1", T0 + timedelta(minutes=2), "B", cls="mid_buck")
    # a strict female threshold splits doe A into two deer; at 0.6 their profiles look alike
    decide_partition(engine, "cam1", "2024-05-01",
                     MatchingSettings(search="exact", thresholds_by_sex={"female": 0.999}))
    with engine.connect() as conn:
        merge = health.check_merge_candidates(conn, "cam1", "2024-05-01", {"multiscale": 0.6, "efficientnet_b0": 0.4}, 0.6)
        emb = health.check_embeddings_consistent(conn, "cam1", "2024-05-01")
    assert not merge.passed and merge.severity == "WARN" and len(merge.table) == 1
    assert merge.table[0]["profile_similarity"] >= 0.6
    assert emb.passed, emb.description
    # a vector that is not unit-norm, and a decision made with another version, are errors
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE embeddings SET vector = CAST(:v AS vector) WHERE detection_id = :d"),
                     {"d": a1, "v": "[" + ",".join(["2"] + ["0"] * 511) + "]"})
        conn.execute(sa.text("UPDATE sightings SET embedding_version = 'other' WHERE detection_id = :d"), {"d": a1})
    with engine.connect() as conn:
        emb = health.check_embeddings_consistent(conn, "cam1", "2024-05-01")
    assert not emb.passed and emb.severity == "ERROR"
    assert "norms" in emb.description and "2 embedding versions" in emb.description


def test_threshold_report_asset(engine, data_dir):
    w = SyntheticWorld(engine)
    ids = [w.sighting("cam1", T0 + timedelta(minutes=i), ident) for i, ident in enumerate("ABABCCA")]
    w.truth_to_db(ids)
    decide_partition(engine, "cam1", "2024-05-01", MatchingSettings(search="exact"))
    result = dg.materialize([threshold_report], raise_on_error=True,
                            resources={"database": DeerDatabase(), "identity": identity(), "inference": InferenceResource()})
    meta = result.asset_materializations_for_node("threshold_report")[0].metadata
    assert meta["truth_source"].value == "true_identities" and meta["truth_pairs"].value == 21
    assert 0.0 <= meta["recommended_threshold"].value <= 1.0
    assert meta["best_f1"].value == pytest.approx(1.0)        # well separated synthetic deer
    assert "would match" in meta["report"].value
    assert meta["plot"].value.startswith(str(data_dir / "reports"))
    # the plot itself, inline, so the UI shows it (markdown with a PNG data URI)
    assert meta["plot_image"].value.startswith("![threshold report](data:image/png;base64,iVBOR")


# ---------------------------------------------------------------------------------------------
# alerts

class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        _Hook.received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def webhook():
    _Hook.received = []
    server = HTTPServer(("127.0.0.1", 0), _Hook)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hooks/secret-token", _Hook.received
    server.shutdown()
    server.server_close()


def test_failed_checks_become_alerts_posted_to_the_webhook(engine, webhook, monkeypatch, caplog):
    url, received = webhook
    with engine.begin() as conn:
        health.record_check(conn, "matches_happen", "cam1|2024-05-01", False, "ERROR",
                           {"description": "threshold too high", "max_similarity": 0.8})
        health.record_check(conn, "assignment_rate_in_bounds", "cam1|2024-05-01", True, "WARN", {})
    monkeypatch.setenv(alerts.WEBHOOK_ENV, url)
    ctx = dg.build_sensor_context(cursor=None, resources={"database": DeerDatabase()})
    result = failed_check_alerts(ctx)
    assert len(received) == 1
    body = received[0]
    assert body["check"] == "matches_happen" and body["severity"] == "ERROR"
    assert body["partition"] == "cam1|2024-05-01" and "threshold too high" in body["text"]
    assert body["details"]["max_similarity"] == 0.8
    assert result.cursor == str(alerts.last_check_id(engine) - 1)     # the failed one, not the passed one
    # the same failure is not alerted twice
    again = failed_check_alerts(dg.build_sensor_context(cursor=result.cursor, resources={"database": DeerDatabase()}))
    assert len(received) == 1 and again.skip_reason is not None


def test_a_dead_webhook_is_logged_not_raised(engine, caplog):
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()                      # nothing listens there now
    check = {"check_id": 1, "check_name": "matches_happen", "partition_key": None, "severity": "ERROR",
             "details": {"description": "x"}, "checked_at": None}
    with caplog.at_level("ERROR"):
        counts = alerts.send_alerts([check], f"http://127.0.0.1:{port}/hook/token", timeout=1.0)
    assert counts == {"alerts": 1, "posted": 0, "post_failures": 1}
    assert "unreachable" in caplog.text and "token" not in caplog.text
    assert "check matches_happen failed" in caplog.text
