"""Resources: the store and the crop store. The inference resource lives in
``defs/inference.py`` and the identity settings in ``defs/identity.py``."""

from __future__ import annotations

from typing import Optional

import dagster as dg
from pydantic import Field
from sqlalchemy.engine import Engine

from deer_pipeline import db


class DeerDatabase(dg.ConfigurableResource):
    """PostgreSQL + pgvector. ``url`` (or DEER_DATABASE_URL) picks a server; when neither is set
    the embedded server in DEER_DATA_DIR (default .deer/) is started and reused."""

    url: Optional[str] = Field(default=None, description="postgresql:// URL; None = env or embedded")

    def engine(self) -> Engine:
        return db.get_engine(db._sqlalchemy_url(self.url) if self.url else None)


class CropStore(dg.ConfigurableResource):
    """Where crops are written (content-addressed) and the crop rules."""

    root: Optional[str] = Field(default=None, description="directory; None = DEER_CROP_STORE or <data dir>/crops")
    min_crop_px: int = 50
    pad_fraction: float = 0.05

    def settings(self):
        from deer_pipeline.settings import CropSettings

        kwargs = {"min_crop_px": self.min_crop_px, "pad_fraction": self.pad_fraction}
        if self.root:
            kwargs["store_dir"] = self.root
        return CropSettings(**kwargs)
