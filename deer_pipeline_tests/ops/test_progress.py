"""Progress: bars only on a terminal (and not with --quiet), log lines with rate and ETA."""

from __future__ import annotations

import io

from deer_pipeline.ops import progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_progress_log_reports_rate_and_eta_every_n_batches():
    now = [100.0]
    lines = []
    plog = progress.ProgressLog(lines.append, total=100, what="crops", every=2, clock=lambda: now[0])
    for _ in range(5):
        now[0] += 2.0
        plog.batch_done(10)
    assert lines == ["crops: 20/100 (20%), 5.0/s, ETA 16s", "crops: 40/100 (40%), 5.0/s, ETA 12s"]
    now[0] += 10
    plog.batch_done(50)                       # the last batch is always reported
    assert lines[-1].startswith("crops: 100/100 (100%)") and lines[-1].endswith("ETA 0s")
    assert progress.format_duration(3725) == "1h02m05s" and progress.format_duration(float("nan")) == "?"


def test_bars_only_on_a_terminal_and_not_when_quiet(monkeypatch):
    monkeypatch.delenv("DEER_QUIET", raising=False)
    items = [1, 2, 3]
    monkeypatch.setattr("sys.stderr", io.StringIO())                 # a pipe or a log file
    assert not progress.bars_enabled() and progress.progress(items) is items
    tty = _Tty()
    monkeypatch.setattr("sys.stderr", tty)
    assert progress.bars_enabled()
    assert list(progress.progress(items, desc="reading photos", unit="photo")) == items
    assert "reading photos" in tty.getvalue() and "/3 [" in tty.getvalue()
    assert progress.progress(items, quiet=True) is items            # --quiet
    monkeypatch.setenv("DEER_QUIET", "1")
    assert not progress.bars_enabled() and progress.progress(items) is items
    with progress.ProgressBar(3, quiet=None) as bar:                 # a no-op when off
        bar.update(3)


def test_crop_asset_logs_progress(engine, tmp_path):
    from deer_pipeline.detections.cropping import crop_partition
    from deer_pipeline.settings import CropSettings
    from deer_pipeline_tests.export.demo_data import make_demo_like

    _, report = make_demo_like(engine, tmp_path / "s", n_cameras=1)
    camera, day = report.partitions[0]
    lines = []
    crop_partition(engine, camera, day, CropSettings(store_dir=str(tmp_path / "crops")), progress_log=lines.append)
    assert lines and lines[-1].startswith(f"crops {camera}|{day}: photos: ") and "/s, ETA" in lines[-1]
