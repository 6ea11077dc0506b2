"""Alerts: failed checks become a log line always, and a JSON POST to a webhook
(``DEER_ALERT_WEBHOOK_URL``) when one is configured. Webhook errors are logged, never raised: an
unreachable chat server must not stop the pipeline.

Plain logic (SQL + ``requests``), no Dagster.
"""

from __future__ import annotations

import json
import logging
from typing import Iterable, Mapping

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from deer_pipeline import settings

log = logging.getLogger(__name__)

WEBHOOK_ENV = "DEER_ALERT_WEBHOOK_URL"
DEFAULT_TIMEOUT_S = 5.0


def webhook_url() -> str | None:
    url = settings.env(WEBHOOK_ENV, "").strip()
    return url or None


def failed_checks_since(engine: Engine, after_check_id: int, limit: int = 200) -> list[dict]:
    """Failed checks recorded after ``after_check_id`` (oldest first)."""
    with engine.connect() as conn:
        rows = conn.execute(sa.text(
            "SELECT check_id, check_name, partition_key, severity, details, checked_at FROM check_results "
            "WHERE check_id > :c AND NOT passed ORDER BY check_id LIMIT :n"),
            {"c": int(after_check_id), "n": int(limit)}).all()
    return [dict(r._mapping) for r in rows]


def last_check_id(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT coalesce(max(check_id), 0) FROM check_results")).scalar_one())


def format_alert(check: Mapping) -> dict:
    """The JSON body of one alert: a one-line ``text`` (Slack/Mattermost-compatible) plus fields."""
    details = check.get("details") or {}
    if isinstance(details, str):
        details = json.loads(details)
    where = f" on {check['partition_key']}" if check.get("partition_key") else ""
    text = (f"[deer_pipeline] {check['severity']}: check {check['check_name']} failed{where}: "
            f"{details.get('description', '')}").rstrip(": ")
    checked_at = check.get("checked_at")
    return {"text": text, "check": check["check_name"], "partition": check.get("partition_key"),
            "severity": check["severity"], "check_id": check.get("check_id"),
            "checked_at": checked_at.isoformat() if hasattr(checked_at, "isoformat") else checked_at,
            "details": details}


def post_webhook(url: str, payload: Mapping, timeout: float = DEFAULT_TIMEOUT_S) -> bool:
    """POST ``payload`` as JSON; True on a 2xx answer. Errors are logged, not raised."""
    import requests

    try:
        resp = requests.post(url, data=json.dumps(payload, default=str),
                             headers={"Content-Type": "application/json"}, timeout=timeout)
    except requests.RequestException as exc:
        # the exception text repeats the URL (and its token): name the error only
        log.error("alert webhook %s unreachable: %s", _safe(url), type(exc).__name__)
        return False
    if not 200 <= resp.status_code < 300:
        log.error("alert webhook %s answered %s: %s", _safe(url), resp.status_code, resp.text[:200])
        return False
    return True


def _safe(url: str) -> str:
    """The URL without its path/query (webhook URLs often carry a secret token)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}/..."


def send_alerts(checks: Iterable[Mapping], url: str | None = None, logger: logging.Logger | None = None,
                timeout: float = DEFAULT_TIMEOUT_S) -> dict:
    """Alert on each failed check: a log line always, a POST when ``url`` is set."""
    logger = logger or log
    sent = posted = failed = 0
    for check in checks:
        payload = format_alert(check)
        if payload["severity"] == "ERROR":
            logger.error(payload["text"])
        else:
            logger.warning(payload["text"])
        sent += 1
        if url:
            if post_webhook(url, payload, timeout=timeout):
                posted += 1
            else:
                failed += 1
    return {"alerts": sent, "posted": posted, "post_failures": failed}
