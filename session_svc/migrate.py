"""``python -m session_svc.migrate``: apply the schema migrations (alembic) to DATABASE_URL/DB_SCHEMA.

Applying them again is a no-op: alembic records the revision in ``<schema>.alembic_version``.
"""

from __future__ import annotations

import logging
from pathlib import Path

from alembic import command
from alembic.config import Config

from session_svc.settings import Settings

_HERE = Path(__file__).parent / "storage" / "migrations"


def alembic_config(settings: Settings) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(_HERE))
    url = settings.database_url.replace("postgresql://", "postgresql+asyncpg://", 1)
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["schema"] = settings.db_schema
    return cfg


def upgrade(settings: Settings) -> None:
    command.upgrade(alembic_config(settings), "head")


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    settings = Settings.from_env()
    upgrade(settings)
    logging.getLogger("session_svc").info("schema %s is at the latest revision", settings.db_schema)


if __name__ == "__main__":
    main()
