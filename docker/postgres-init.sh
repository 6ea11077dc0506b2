#!/bin/sh
# Runs once, when the postgres volume is empty (docker-entrypoint-initdb.d): creates Dagster's
# database beside the pipeline's (POSTGRES_DB) and pgvector in the pipeline's database.
# The pipeline's own tables come from `deer-pipeline db migrate` (the `migrate` service).
set -eu
psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" <<SQL
CREATE EXTENSION IF NOT EXISTS vector;
SELECT 'CREATE DATABASE "${DAGSTER_DATABASE_NAME}"'
WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = '${DAGSTER_DATABASE_NAME}')\gexec
SQL
