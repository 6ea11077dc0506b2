"""Operating the pipeline: Dagster instance helpers, the celery app, the ``ui``, ``status`` and ``db`` commands, and alerts."""
