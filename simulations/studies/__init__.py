"""Study discovery: every module of this package that defines ``STUDY``.

A module ``simulations/studies/NAME.py`` defining ``STUDY = Study(name=..., ...)`` is found
by :func:`available_studies` without being registered anywhere. :func:`get_study` also
accepts ``"package.module:ATTRIBUTE"`` for studies that live elsewhere (tests use it).
"""

from __future__ import annotations

import importlib
import pkgutil

__all__ = ["available_studies", "get_study"]


def _study_modules():
    """Names of the public modules of this package (``_private`` ones are skipped)."""
    return sorted(info.name for info in pkgutil.iter_modules(__path__)
                  if not info.name.startswith("_"))


def available_studies():
    """Every discoverable study, as a dict from study name to :class:`Study`."""
    studies = {}
    for module_name in _study_modules():
        module = importlib.import_module(f"{__name__}.{module_name}")
        study = getattr(module, "STUDY", None)
        if study is not None:
            studies[study.name] = study
    return studies


def _from_import_path(spec):
    module_name, _, attribute = spec.partition(":")
    return getattr(importlib.import_module(module_name), attribute or "STUDY")


def get_study(name):
    """The study called ``name``, or the object at the import path ``"module:ATTR"``.

    The module of the same name is tried first, so asking for one study does not import
    the others.
    """
    if ":" in name:
        return _from_import_path(name)
    if name in _study_modules():
        study = getattr(importlib.import_module(f"{__name__}.{name}"), "STUDY", None)
        if study is not None and study.name == name:
            return study
    studies = available_studies()
    if name not in studies:
        raise KeyError(f"unknown study {name!r}; available: {sorted(studies)}.")
    return studies[name]
