"""The Dagster layer: thin definitions over the plain logic in ``deer_pipeline``."""
