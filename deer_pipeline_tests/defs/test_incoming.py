"""The drop-folder sensor: each new detector file in DEER_INCOMING_DIR is ingested once."""

from __future__ import annotations

import json
import os

import dagster as dg
import sqlalchemy as sa

# Imported here, not inside a test's DagsterInstance context: Dagster objects built at import
# time while an instance is entered keep a weak reference to it, which later tests would trip on.
from deer_pipeline.defs.incoming import incoming_detector_files_sensor, ingest_file_job
from deer_pipeline.defs.resources import DeerDatabase
from deer_pipeline_tests.detections.test_images import write_photo


def _md(files):
    return {"info": {"format_version": "1.4", "detector_metadata": {"typical_detection_threshold": 0.2}},
            "detection_categories": {"1": "animal", "2": "person"},
            "classification_categories": {"0": "white-tailed deer"},
            "images": [{"file": f, "detections": [
                {"category": "1", "conf": 0.9, "bbox": [0.1, 0.1, 0.3, 0.3], "classifications": [["0", 0.9]]}]}
                for f in files]}


def _evaluate(instance, cursor=None):
    return incoming_detector_files_sensor(dg.build_sensor_context(instance=instance, cursor=cursor))


def _run(instance, request):
    """What the requested run does: its run config is valid for ingest_file_job, and its one op
    ingests the file. (The op is invoked directly: executing a job in process here leaves Dagster
    state behind that breaks later tests' instances.)"""
    from deer_pipeline.defs.incoming import IngestFileConfig, ingest_detector_file

    dg.validate_run_config(ingest_file_job, request.run_config)
    config = IngestFileConfig(**request.run_config["ops"]["ingest_detector_file"]["config"])
    output = ingest_detector_file(dg.build_op_context(resources={"database": DeerDatabase()}), config)
    assert output.metadata["new_detections"].value >= 1
    return output


def test_drop_folder_sensor_ingests_each_new_file_once(engine, tmp_path, monkeypatch):
    drop = tmp_path / "incoming"
    (drop / "cam-i").mkdir(parents=True)
    for i in range(3):
        write_photo(drop / "cam-i" / f"f{i}.jpg", size=(320, 240), when=f"2025:10:04 07:00:0{i}", seed=60 + i)
    monkeypatch.setenv("DEER_INCOMING_SETTLE_S", "0")
    with dg.instance_for_test() as instance:
        monkeypatch.delenv("DEER_INCOMING_DIR", raising=False)
        assert "not set" in _evaluate(instance).skip_reason.skip_message
        monkeypatch.setenv("DEER_INCOMING_DIR", str(drop))
        assert "no new detector files" in _evaluate(instance).skip_reason.skip_message

        (drop / "first.json").write_text(json.dumps(_md(["cam-i/f0.jpg", "cam-i/f1.jpg"])))
        (drop / "copying.json.part").write_text("{")                      # ignored while copying
        (drop / ".hidden.json").write_text("{")
        first = _evaluate(instance)
        assert len(first.run_requests) == 1
        assert first.run_requests[0].run_config["ops"]["ingest_detector_file"]["config"]["path"] == \
            str((drop / "first.json").resolve())
        _run(instance, first.run_requests[0])
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM detections WHERE status = 'ok'")).scalar_one() == 2

        # the next tick with the cursor: nothing new
        again = _evaluate(instance, cursor=first.cursor)
        assert not again.run_requests and again.skip_reason is not None

        # a second file: only it is requested
        (drop / "second.json").write_text(json.dumps(_md(["cam-i/f2.jpg"])))
        second = _evaluate(instance, cursor=first.cursor)
        assert [r.tags["deer/incoming_file"] for r in second.run_requests] == ["second.json"]
        assert second.run_requests[0].run_key != first.run_requests[0].run_key
        _run(instance, second.run_requests[0])
        assert not _evaluate(instance, cursor=second.cursor).run_requests
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT count(*) FROM detections")).scalar_one() == 3
            assert conn.execute(sa.text("SELECT count(*) FROM ingest_batches")).scalar_one() == 2

        # a file still being written is waited for
        monkeypatch.setenv("DEER_INCOMING_SETTLE_S", "3600")
        (drop / "third.json").write_text(json.dumps(_md(["cam-i/f0.jpg"])))
        waiting = _evaluate(instance, cursor=second.cursor)
        assert not waiting.run_requests and "still changing" in waiting.skip_reason.skip_message
        os.utime(drop / "third.json", (0, 0))              # old enough now
        assert len(_evaluate(instance, cursor=second.cursor).run_requests) == 1
