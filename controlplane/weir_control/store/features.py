"""Feature definition records: one TOML document, versioned; data planes receive it in the desired state."""

from __future__ import annotations

from sqlalchemy import select

from weir_control.store.db import Database, bump_revision, now, retried
from weir_control.store.schema import FEATURE_DEFINITIONS


class FeatureRecords(Database):
    # --- feature definitions ---------------------------------------------------------------------

    @retried
    def apply_features(self, definitions_toml: str, actor: str) -> int:
        """Replace the definitions (already validated); bumps the desired-state revision."""
        with self._transaction() as connection:
            current = connection.execute(
                select(FEATURE_DEFINITIONS.c.revision).where(FEATURE_DEFINITIONS.c.id == 1)
            ).scalar()
            revision = int(current or 0) + 1
            values = {
                "revision": revision,
                "definitions_toml": definitions_toml,
                "updated_by": actor,
                "updated_at": now(),
            }
            self._upsert(connection, FEATURE_DEFINITIONS, {"id": 1}, values)
            bump_revision(connection)
            return revision

    def feature_definitions(self) -> tuple[int, str]:
        with self._transaction() as connection:
            row = connection.execute(
                select(FEATURE_DEFINITIONS.c.revision, FEATURE_DEFINITIONS.c.definitions_toml).where(
                    FEATURE_DEFINITIONS.c.id == 1
                )
            ).first()
        return (int(row.revision), row.definitions_toml) if row else (0, "")
