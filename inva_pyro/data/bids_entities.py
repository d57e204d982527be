"""BIDS entity keys as people type them (``acq``, ``trc``, ``ses``) and as pybids names them.

File names carry short keys (``sub-01_ses-mri_acq-mprage_T1w``); pybids' queries take long names
(``subject``, ``session``, ``acquisition``). Both are accepted. The mapping is read from pybids'
own configuration (the ``bids`` and ``derivatives`` configs that every layout here loads): each
entity's file-name ``pattern`` holds its key, e.g. ``[_/\\\\]+acq-([a-zA-Z0-9+]+)`` for
``acquisition``. Entities without a ``key-`` pattern (``suffix``, ``extension``, ``datatype``) are
typed by their name.
"""
from __future__ import annotations

import difflib
import re
from functools import lru_cache

from ..errors import InputError

# The value meaning "this entity is absent from the file name" (pybids' Query.NONE).
ABSENT = "none"
# Entities that define rows (one per subject) rather than select files.
ROW_ENTITIES = ("subject",)
_PYBIDS_CONFIGS = ("bids", "derivatives")
_KEY_IN_PATTERN = re.compile(r"([A-Za-z]+)-\(")


@lru_cache(maxsize=1)
def entity_names() -> dict[str, str]:
    """Every accepted key (file-name key and pybids name) mapped to pybids' entity name."""
    from bids.layout.models import Config

    names: dict[str, str] = {}
    keys: dict[str, str] = {}
    for config in _PYBIDS_CONFIGS:
        for entity in Config.load(config).entities.values():
            names[entity.name] = entity.name
            found = _KEY_IN_PATTERN.search(entity.pattern or "")
            if found:
                keys.setdefault(found.group(1), entity.name)
    # A long name wins over a file-name key spelled the same, so that no pybids name is shadowed.
    return {**keys, **names}


@lru_cache(maxsize=1)
def file_keys() -> dict[str, str]:
    """pybids' entity name mapped to the key a file name shows (``tracer`` -> ``trc``)."""
    shown: dict[str, str] = {}
    for key, name in entity_names().items():
        if key != name or name not in shown:
            shown[name] = key
    return shown


def entity_name(key: str, spec_text: str) -> str:
    """pybids' name of ``key`` as typed in ``--image SPEC``; an unknown key names the closest valid ones."""
    names = entity_names()
    if key in names:
        return names[key]
    lowered = key.lower()
    if lowered in names:
        raise InputError(f"--image {spec_text}: unknown BIDS entity '{key}' (entity keys are lower case: "
                         f"'{lowered}')")
    close = difflib.get_close_matches(key, sorted(names), n=3, cutoff=0.5)
    if close:
        hint = "did you mean " + " or ".join(f"'{c}'" for c in close) + "?"
    else:
        hint = "keys: " + ", ".join(sorted(set(file_keys().values())))
    raise InputError(f"--image {spec_text}: unknown BIDS entity '{key}' ({hint})")


def shown_key(name: str) -> str:
    """The key of pybids' entity ``name`` as a file name shows it (for messages)."""
    return file_keys().get(name, name)


def query_value(value: str):
    """The pybids query value for a typed value: ``none`` is pybids' Query.NONE (entity absent)."""
    if value == ABSENT:
        from bids.layout import Query
        return Query.NONE
    return value
