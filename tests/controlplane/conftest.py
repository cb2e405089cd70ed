"""The control plane tests use ``store_url`` from the root conftest (SQLite and PostgreSQL)."""
