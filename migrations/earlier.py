"""SQL that earlier revisions wrote, for later revisions that replace it (and put it back on
downgrade) without a copy of it."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

_VERSIONS = Path(__file__).with_name("versions")


def revision(filename: str) -> ModuleType:
    """The revision module in versions/ named `filename`."""
    path = _VERSIONS / filename
    spec = importlib.util.spec_from_file_location(f"escrowd_revision_{path.stem}", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def function(filename: str, name: str, attribute: str = "FUNCTIONS") -> str:
    """The CREATE FUNCTION statement of `name` in the revision's `attribute` (SQL text), as
    CREATE OR REPLACE."""
    sql: str = getattr(revision(filename), attribute)
    found = re.search(rf"CREATE (?:OR REPLACE )?FUNCTION {name}\(.*?\n\$\$;\n", sql, re.DOTALL)
    if found is None:
        raise RuntimeError(f"{filename} defines no function {name}")
    return re.sub(r"^CREATE (?:OR REPLACE )?FUNCTION", "CREATE OR REPLACE FUNCTION", found.group(0))
