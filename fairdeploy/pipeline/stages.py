"""Stage caching: a stage reruns only when the hash of its inputs (config + upstream outputs) changed."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fairdeploy.io import read_json, sha256_file, write_json

STAGE_FILE = "stage.json"


def hash_inputs(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def hash_path(path: Path) -> str:
    """Content hash of a file, or of every file under a directory (names and contents)."""
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


@dataclass(frozen=True)
class StageOutcome:
    name: str
    status: str  # "ran" | "up to date"
    seconds: float
    outputs: dict[str, str]  # output name -> content hash


def run_stage(
    stage_dir: Path,
    name: str,
    inputs: dict[str, Any],
    outputs: Sequence[str],
    run: Callable[[], Any],
    record: str = STAGE_FILE,
) -> StageOutcome:
    """Run `run()` unless stage_dir/`record` records the same input hash and all outputs exist.

    `outputs` are paths relative to stage_dir. The record is written last, so an interrupted stage
    has none and runs again. A stage that shares its folder with others (the report, in the run
    folder) names its own record.
    """
    key = hash_inputs(inputs)
    record_path = stage_dir / record
    if record_path.is_file():
        record = read_json(record_path)
        if record.get("inputs_hash") == key and all((stage_dir / o).exists() for o in outputs):
            return StageOutcome(name, "up to date", 0.0, dict(record.get("outputs", {})))
        record_path.unlink()
    stage_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    run()
    seconds = time.perf_counter() - t0
    hashes = {o: hash_path(stage_dir / o) for o in outputs}
    write_json(record_path, {"stage": name, "inputs_hash": key, "inputs": inputs, "outputs": hashes,
                             "seconds": seconds, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    return StageOutcome(name, "ran", seconds, hashes)
