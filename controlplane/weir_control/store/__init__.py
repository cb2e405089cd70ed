"""The control plane's metadata store: SQLAlchemy Core on SQLite (default) or PostgreSQL."""

from weir_control.store.store import Store, open_store

__all__ = ["Store", "open_store"]
