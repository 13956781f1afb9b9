"""Read what an offline W&B run wrote to its ``.wandb`` file, so tests check the real files rather than a mock.

The file is a LevelDB-style log (the format W&B documents for its transaction log): a 7-byte header
(``:W&B``, magic, version), then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type:
1 full, 2 first, 3 middle, 4 last) and a protobuf ``Record`` as payload.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path
from typing import Any

import wandb
from wandb.proto import wandb_internal_pb2

BLOCK = 32768
HEADER = 7


def _payloads(data: bytes):
    offset, pending = HEADER, b""
    while offset + HEADER <= len(data):
        left_in_block = BLOCK - offset % BLOCK
        if left_in_block < HEADER:
            offset += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        chunk = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:
            offset += BLOCK - offset % BLOCK if offset % BLOCK else 0
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            yield pending + chunk
            pending = b""


def read_offline_run(run_folder: Path) -> dict[str, Any]:
    """Summary, config, history rows, metric definitions, group, tags and job type recorded in ``run_folder/*.wandb``.

    ``history`` holds one dict per logged row (``_step`` among its keys); ``metrics`` maps each ``define_metric`` name
    or glob to its ``step_metric`` and ``summary`` (a protobuf message with ``min``, ``last``, ... flags).
    """
    # W&B's service completes an offline run's log when it shuts down; do that before reading.
    wandb.teardown()
    (path,) = Path(run_folder).glob("*.wandb")
    out: dict[str, Any] = {"summary": {}, "config": {}, "history_keys": set(), "history": [], "group": None, "tags": [],
                           "job_type": None, "metrics": {}}
    for payload in _payloads(path.read_bytes()):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            for item in record.summary.update:
                out["summary"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "run":
            out["group"], out["tags"], out["job_type"] = record.run.run_group, list(record.run.tags), record.run.job_type
        elif kind == "config":
            for item in record.config.update:
                out["config"][item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            out["history_keys"].update(row)
            out["history"].append(row)
        elif kind == "metric":
            # define_metric: name (or glob) -> its step metric and summary settings
            metric = record.metric
            out["metrics"][metric.name or metric.glob_name] = {
                "step_metric": metric.step_metric, "summary": metric.summary}
    return out


def offline_runs(run_dir: Path) -> list[Path]:
    """The offline W&B run folders written under a run folder."""
    return sorted(Path(run_dir).glob("wandb/offline-run-*"))


def run_id_of(run_folder: Path) -> str:
    """The W&B run id in an offline run folder's name, ``offline-run-<time>-<id>``; W&B appends ``-1``, ``-2``, ...
    when a resumed run starts within the same second as the folder before it."""
    match = re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(?:-\d+)?", Path(run_folder).name)
    assert match, f"not an offline W&B run folder: {run_folder}"
    return match.group(1)
