"""``deer-pipeline ui``: the Dagster UI and daemon (``dagster dev``) on the pipeline's PostgreSQL.

With no database configured, the embedded PostgreSQL in the data directory holds both the deer
(database ``deer``) and Dagster's runs and event logs (database ``dagster``); DAGSTER_HOME is
``<data dir>/dagster_home`` with a copy of the repository's ``dagster.yaml``. In production
(``DEER_DATABASE_URL`` set) every variable the instance file reads must be set as well, and a
missing one stops the command before anything starts, naming the variable.

Arguments are passed to ``dagster dev``: ``deer-pipeline ui -p 3000 -h 127.0.0.1``. The
repository's ``workspace.yaml`` is used unless a workspace or module is given.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from deer_pipeline import db, settings

REPO_ROOT = Path(__file__).resolve().parents[2]
WORKSPACE_YAML = REPO_ROOT / "workspace.yaml"
DAGSTER_YAML = REPO_ROOT / "dagster.yaml"
# dagster dev can drop a SIGTERM that lands while it holds interrupts (dagster's
# capture_interrupts forgets a captured one when it exits): say it again after this long, and
# stop it for good after STOP_TIMEOUT_S (a last resort: the cause seen in CI was an ignored
# SIGINT, handled below)
RESEND_TERM_S = 45
STOP_TIMEOUT_S = 150

# `dagster dev` options that name the code to load; when one is given, workspace.yaml is not added.
_TARGET_OPTIONS = ("-w", "--workspace", "-m", "--module-name", "-f", "--python-file",
                   "--package-name", "--autoload-defs-module-name", "--grpc-port",
                   "--grpc-socket")


class UiError(RuntimeError):
    """The UI cannot start; the message says which setting is missing."""


def required_env(instance_yaml: Path = DAGSTER_YAML) -> list[str]:
    """Environment variables an instance file reads (its ``{env: NAME}`` values), in file order."""
    import yaml

    names: list[str] = []

    def walk(node) -> None:
        if isinstance(node, dict):
            if set(node) == {"env"} and isinstance(node["env"], str):
                if node["env"] not in names:
                    names.append(node["env"])
                return
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(yaml.safe_load(instance_yaml.read_text()) or {})
    return names


def missing_env(instance_yaml: Path = DAGSTER_YAML, environ: dict | None = None) -> list[str]:
    value = settings.env if environ is None else environ.get
    return [name for name in required_env(instance_yaml) if not value(name)]


def prepare_environment() -> Path:
    """Check the settings, fill in the embedded defaults and return DAGSTER_HOME.

    Production (DEER_DATABASE_URL set) needs DAGSTER_POSTGRES_URL and every other variable of
    dagster.yaml. Without it the embedded server is started here and its URLs are exported, so
    the processes ``dagster dev`` starts (code server, run workers) connect to it directly.
    """
    from deer_pipeline.ops.instance import prepare_dagster_home

    production = bool(settings.env("DEER_DATABASE_URL"))
    if production:
        missing = missing_env()
        if missing:
            raise UiError(
                "DEER_DATABASE_URL is set, so the UI runs against a production database and "
                f"needs {', '.join(missing)}: set {missing[0]} (see .env.example)")
    try:
        home = prepare_dagster_home()
    except db.DatabaseError as exc:
        raise UiError(str(exc)) from exc
    missing = missing_env(home / "dagster.yaml")
    if missing:
        raise UiError(f"{home / 'dagster.yaml'} reads {', '.join(missing)}, which is not set")
    if not production:
        os.environ["DEER_DATABASE_URL"] = db.database_url()
    return home


def dev_command(argv: list[str], workspace: Path = WORKSPACE_YAML) -> list[str]:
    """The ``dagster dev`` command line for ``argv`` (workspace.yaml unless a target is given)."""
    cmd = [sys.executable, "-m", "dagster", "dev"]
    names_target = any(a == opt or a.startswith(opt + "=") for a in argv for opt in _TARGET_OPTIONS)
    if not names_target:
        cmd += ["-w", str(workspace)]
    return cmd + list(argv)


def _redact(url: str) -> str:
    return re.sub(r"//([^:/@]*):[^@]*@", r"//\1:***@", url)


def main(argv: list[str]) -> int:
    if argv and argv[0] in ("-?", "--usage"):
        print(__doc__)
        return 0
    try:
        home = prepare_environment()
    except UiError as exc:
        print(f"deer-pipeline ui: {exc}", file=sys.stderr)
        return 2
    cmd = dev_command(argv)
    print(f"deer-pipeline ui: DAGSTER_HOME={home}", file=sys.stderr)
    try:   # runs of an earlier session whose process is gone, and the pool slots they held
        from deer_pipeline.ops import recovery
        from deer_pipeline.ops.instance import get_instance

        print(f"deer-pipeline ui: {recovery.recover(get_instance()).summary()}", file=sys.stderr)
    except Exception as exc:   # never keep the UI from starting
        print(f"deer-pipeline ui: recovery skipped: {exc}", file=sys.stderr)
    print(f"deer-pipeline ui: Dagster storage {_redact(settings.env('DAGSTER_POSTGRES_URL'))}",
          file=sys.stderr)
    print(f"deer-pipeline ui: {' '.join(cmd)}", file=sys.stderr)
    # dagster dev stops on SIGTERM by mapping it to its SIGINT handler. A process started in the
    # background by a non-interactive shell (`cmd &`, CI scripts) inherits SIGINT *ignored*, and
    # an ignored signal stays ignored across exec: dagster dev would then ignore SIGTERM too and
    # never stop. So SIGINT is made a KeyboardInterrupt again before dagster dev starts (a
    # handler, unlike SIG_IGN, is reset to the default in the child, where Python installs its own).
    previous_int = signal.getsignal(signal.SIGINT)
    if previous_int == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    child = subprocess.Popen(cmd, cwd=REPO_ROOT)
    terminated: list[float] = []           # when SIGTERM was first passed on

    def forward(signum, _frame):
        if child.poll() is None:
            child.send_signal(signum)
            terminated.append(time.monotonic())

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        resent = False
        while True:
            try:
                return child.wait(timeout=5)
            except subprocess.TimeoutExpired:
                if not terminated:
                    continue
                waited = time.monotonic() - terminated[0]
                if waited > STOP_TIMEOUT_S:
                    print("deer-pipeline ui: dagster dev did not stop; killing it", file=sys.stderr)
                    child.kill()
                elif waited > RESEND_TERM_S and not resent:
                    print("deer-pipeline ui: dagster dev still running; passing SIGTERM on again",
                          file=sys.stderr)
                    child.send_signal(signal.SIGTERM)
                    resent = True
            except KeyboardInterrupt:
                # Ctrl-C reached dagster dev too (same process group): let it shut down cleanly.
                continue
    finally:
        signal.signal(signal.SIGTERM, previous)
        if previous_int == signal.SIG_IGN:
            signal.signal(signal.SIGINT, previous_int)
        if child.poll() is None:
            child.terminate()
            try:
                child.wait(timeout=30)
            except subprocess.TimeoutExpired:
                child.kill()
