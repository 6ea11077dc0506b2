"""Evaluation of re-identification on labelled photos: labels, scoring, the isolated database, the run, the report (JSON/HTML/plots), the methods compared, and the ``evaluate`` command."""
