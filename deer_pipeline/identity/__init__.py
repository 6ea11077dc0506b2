"""Identity: match-or-create with replay, its SQL store, the health checks on stored decisions, the threshold report and its metrics."""
