"""Modules that load when first used, so that loading the code location stays cheap.

The Dagster layer (``deer_pipeline.defs``) names the library modules its steps call, but a code
server, ``dg check defs`` or a sensor tick only needs the definitions: importing numpy,
SQLAlchemy, PIL and every library module for them costs ~0.4 s per process on the 2-core
machine (issue 15: loading the code location under 1.5 s).

``lazy("deer_pipeline.identity.matching")`` returns the module itself when it is already
imported, else a stand-in that imports it on the first attribute read. The stand-in is not put
in ``sys.modules`` (every ``import`` elsewhere gets the real module, loaded the normal way);
reads, writes and deletes of its attributes go to the real module, so ``monkeypatch.setattr``
through it patches the module its functions see. Concurrent first reads are safe: the import
system's per-module lock makes a second thread wait for the first import to finish.
"""

from __future__ import annotations

import importlib
import sys
import types


class LazyModule(types.ModuleType):
    """Stands in for the module of the same name until it is used."""

    def __getattr__(self, attr: str):          # only for names the stand-in itself lacks
        return getattr(importlib.import_module(self.__name__), attr)

    def __setattr__(self, attr: str, value) -> None:
        setattr(importlib.import_module(self.__name__), attr, value)

    def __delattr__(self, attr: str) -> None:
        delattr(importlib.import_module(self.__name__), attr)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self.__name__))

    def __repr__(self) -> str:
        state = "loaded" if self.__name__ in sys.modules else "not loaded yet"
        return f"<lazy module {self.__name__!r} ({state})>"


def lazy(name: str) -> types.ModuleType:
    """The module ``name`` if imported, else a :class:`LazyModule` that imports it when used."""
    return sys.modules.get(name) or LazyModule(name)
