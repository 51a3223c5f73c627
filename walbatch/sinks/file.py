"""File sink: appends JSON lines ``{"log_id", "seq", "item"}`` (and ``"key"`` for keyed
items) and fsyncs per batch.

At-least-once: after a crash a batch may be appended again. Every line carries
its identity, so a reader keeps the first line per (log_id, seq).
"""

from __future__ import annotations

import base64
import json
import os
from typing import Any

from ..record import Batch


class FileSink:
    def __init__(self, path: str) -> None:
        self.path = path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        self._f = open(path, "ab")

    def write(self, batch: Batch) -> list[BaseException | None]:
        lines: list[bytes] = []
        outcomes: list[BaseException | None] = []
        key = getattr(batch, "key", None)
        for r in batch:
            entry = {"log_id": batch.log_id, "seq": r.seq, "item": r.item}
            if key is not None:
                entry["key"] = key
            try:
                line = json.dumps(entry, default=_json_default, separators=(",", ":"))
            except (TypeError, ValueError) as ex:
                outcomes.append(ex)
                continue
            lines.append(line.encode() + b"\n")
            outcomes.append(None)
        self._f.write(b"".join(lines))
        self._f.flush()
        os.fsync(self._f.fileno())
        return outcomes

    def close(self) -> None:
        self._f.close()


def _json_default(v: Any) -> Any:
    if isinstance(v, bytes):
        return {"$base64": base64.b64encode(v).decode()}
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")
