"""Which names are local paths: a name that looks like one is never sent to the Hub.

A missing local folder given as ``--model`` or ``--config`` would otherwise be tried as a Hub repo
id, which costs 20-50 s of retries (and a screen of retry lines) before the error.
"""

from __future__ import annotations

import os


def looks_local(name: str, suffixes: tuple[str, ...] = ()) -> bool:
    """Whether ``name`` is meant as a local path: absolute, starting with ``./``, ``../`` or ``~``,
    inside a folder that exists here (``models/mine`` beside a ``models`` folder), or ending with one
    of ``suffixes`` (file extensions no Hub repo id ends with, such as ``.json``)."""
    if os.path.isabs(name) or name in (".", "..", "~") or name.startswith(("./", "../", "~/")):
        return True
    if suffixes and name.lower().endswith(suffixes):
        return True
    parent = os.path.dirname(name)
    return bool(parent) and os.path.isdir(os.path.expanduser(parent))


def missing_local(name: str) -> str:
    """Why ``name`` (a local-looking path that does not exist) is not found, for a one-line error."""
    parent = os.path.dirname(name)
    if parent and os.path.isdir(os.path.expanduser(parent)) and not os.path.isabs(name) \
            and not name.startswith((".", "~")):
        return f"{name} does not exist here (it is read as a local path because the folder {parent} exists)"
    return f"{name} does not exist"
