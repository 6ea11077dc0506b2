"""The alert sensor: failed checks (rows of ``check_results`` with passed = false) become a log
line and, when ``DEER_ALERT_WEBHOOK_URL`` is set, a POST to that webhook. Thin over
``deer_pipeline.ops.alerts``. The cursor is the last ``check_id`` handled, so each failure is
alerted once."""

import dagster as dg

from deer_pipeline.defs.resources import DeerDatabase
from deer_pipeline.lazy_modules import lazy

alerts = lazy("deer_pipeline.ops.alerts")


@dg.sensor(
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Turns failed identity checks (check_results) into alerts: a log line always, a JSON POST "
                "to DEER_ALERT_WEBHOOK_URL when configured. Cursor: the last check_id alerted.",
)
def failed_check_alerts(context: dg.SensorEvaluationContext, database: DeerDatabase) -> dg.SensorResult:
    engine = database.engine()
    cursor = int(context.cursor) if context.cursor else 0
    failed = alerts.failed_checks_since(engine, cursor)
    if not failed:
        return dg.SensorResult(skip_reason=dg.SkipReason(f"no failed checks after check_id {cursor}"))
    counts = alerts.send_alerts(failed, alerts.webhook_url(), context.log)
    new_cursor = max(int(c["check_id"]) for c in failed)
    return dg.SensorResult(
        skip_reason=dg.SkipReason(f"alerted {counts['alerts']} failed check(s), posted {counts['posted']}, "
                                  f"{counts['post_failures']} post failure(s)"),
        cursor=str(new_cursor),
    )
