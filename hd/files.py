"""Small files that are replaced whole (configs, records, result tables): a crash leaves the old file or the
new one, never part of one."""

from __future__ import annotations

import json
import os
from typing import Any

from etils import epath


def replace_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary file beside `path` (a local path or a bucket URL), then rename it over `path`."""
    target = epath.Path(path)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(target)


def replace_json(path: str | os.PathLike, value: Any) -> None:
    """`value` as indented JSON, written as replace_text does."""
    replace_text(path, json.dumps(value, indent=2))
