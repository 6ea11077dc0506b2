"""``deer-pipeline ui`` passes SIGTERM on to dagster dev, says it again when the first one is
lost, and starts dagster dev with SIGINT not ignored even when it was started in the background
(dagster dev handles SIGTERM with its SIGINT handler: an inherited SIG_IGN made it deaf)."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

from deer_pipeline.ops import instance, ui

# a stand-in for dagster dev that swallows the first SIGTERM and stops on the second
STUBBORN = """
import signal, sys, time
seen = []
def on_term(signum, frame):
    seen.append(signum)
    if len(seen) >= 2:
        sys.exit(7)
signal.signal(signal.SIGTERM, on_term)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def _terminate_once_forwarding():                 # as `docker stop` would, once the UI runs
    deadline = time.monotonic() + 60
    while getattr(signal.getsignal(signal.SIGTERM), "__name__", "") != "forward":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    os.kill(os.getpid(), signal.SIGTERM)


def test_a_lost_sigterm_is_passed_on_again(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ui, "prepare_environment", lambda: tmp_path)
    monkeypatch.setattr(ui, "dev_command", lambda argv: [sys.executable, "-c", STUBBORN])
    monkeypatch.setattr(ui, "RESEND_TERM_S", 1)

    def no_instance():
        raise RuntimeError("no Dagster instance in this test")

    monkeypatch.setattr(instance, "get_instance", no_instance)     # recovery is skipped, as it says
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", "postgresql+psycopg2://u:secret@localhost/x")
    threading.Thread(target=_terminate_once_forwarding, daemon=True).start()
    t = time.monotonic()
    assert ui.main([]) == 7                      # the stand-in's exit code: it got the second SIGTERM
    assert time.monotonic() - t < 30
    err = capsys.readouterr().err
    assert "passing SIGTERM on again" in err and "recovery skipped" in err and "secret" not in err
    assert getattr(signal.getsignal(signal.SIGTERM), "__name__", None) != "forward"     # handler restored


# a stand-in for dagster dev: maps SIGTERM to its SIGINT handler as dagster dev does
LIKE_DAGSTER_DEV = """
import signal, sys, time
signal.signal(signal.SIGTERM, signal.getsignal(signal.SIGINT))
try:
    while True:
        time.sleep(0.05)
except KeyboardInterrupt:
    sys.exit(5)
"""


def test_dagster_dev_stops_on_sigterm_when_started_from_the_background(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(ui, "prepare_environment", lambda: tmp_path)
    monkeypatch.setattr(ui, "dev_command", lambda argv: [sys.executable, "-c", LIKE_DAGSTER_DEV])
    monkeypatch.setattr(ui, "RESEND_TERM_S", 60)
    monkeypatch.setattr(instance, "get_instance", lambda: (_ for _ in ()).throw(RuntimeError("no instance")))
    monkeypatch.setenv("DAGSTER_POSTGRES_URL", "postgresql+psycopg2://u:pw@localhost/x")
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)          # as `deer-pipeline ui &` inherits it
    try:
        threading.Thread(target=_terminate_once_forwarding, daemon=True).start()
        t = time.monotonic()
        assert ui.main([]) == 5                  # KeyboardInterrupt from the first SIGTERM
        assert time.monotonic() - t < 30
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN     # restored
    finally:
        signal.signal(signal.SIGINT, before)
    assert "passing SIGTERM on again" not in capsys.readouterr().err
