"""Shared benchmark helpers: argument parsing, interleaved timing, ratios, tables, machine description, JSON."""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a fresh clone without installing: the package is beside us
    sys.path.insert(0, str(REPO))


def base_parser(description: str, default_out: str) -> argparse.ArgumentParser:
    """The options every benchmark has: --device, --out, --seed."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out", default=default_out, help="JSON file the results are written to")
    p.add_argument("--seed", type=int, default=0)
    return p


def resolve(device: str):
    """torch.device from a user string; a bad or unavailable device is one line and exit code 2."""
    from fairdeploy.device import resolve_device
    from fairdeploy.errors import FairdeployError

    try:
        return resolve_device(device)
    except FairdeployError as exc:
        fail(str(exc))


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


# ------------------------------------------------------------------------------------------------------
# timing
# ------------------------------------------------------------------------------------------------------

def synchronizer(device: Any) -> Callable[[], None]:
    """A function that waits for queued GPU work on `device` (a no-op on the CPU)."""
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


STATISTICS = ("min", "median")


@dataclass(frozen=True)
class Timing:
    """Per-call wall times (seconds) of one measured thing, and what one call processes."""

    name: str
    items_per_call: int
    seconds: tuple[float, ...]

    @property
    def median_s(self) -> float:
        return statistics.median(self.seconds)

    @property
    def min_s(self) -> float:
        return min(self.seconds)

    @property
    def per_second(self) -> float:
        """Items (samples, images) per second at the median call time."""
        return self.items_per_call / self.median_s

    @property
    def per_second_best(self) -> float:
        """Items per second at the fastest call (other processes on a shared machine only ever add time)."""
        return self.items_per_call / self.min_s

    def rate(self, statistic: str) -> float:
        """per_second ('median') or per_second_best ('min')."""
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
        return self.per_second_best if statistic == "min" else self.per_second

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "items_per_call": self.items_per_call, "calls": len(self.seconds),
                "seconds": list(self.seconds), "median_s": self.median_s, "min_s": self.min_s,
                "per_second": self.per_second, "per_second_best": self.per_second_best}


def time_interleaved(fns: dict[str, Callable[[], Any]], items: dict[str, int], repeats: int, warmup: int = 1,
                     sync: Callable[[], None] = lambda: None,
                     clock: Callable[[], float] = time.perf_counter) -> dict[str, Timing]:
    """Time every function `repeats` times, round-robin (a, b, c, a, b, c, ...) after `warmup` calls each.

    Interleaving spreads load changes on a shared machine over all the measured things alike, so the
    ratios between them stay meaningful when the absolute times drift.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
            sync()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            sync()
            t0 = clock()
            fn()
            sync()
            times[name].append(clock() - t0)
    return {name: Timing(name, items[name], tuple(times[name])) for name in fns}


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else float("nan")


# ------------------------------------------------------------------------------------------------------
# reporting
# ------------------------------------------------------------------------------------------------------

def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:.{max(digits - 1, 1)}f}"
    return str(value)


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table (readable in a terminal, pasteable into RESULTS.md)."""
    cells = [[fmt(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"
    out = [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    out += [line(r) for r in cells]
    return "\n".join(out)


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def machine(device: Any = None) -> dict[str, Any]:
    """What the numbers were measured on: CPU (with its instruction-set features: INT8 / FP16 kernels depend on
    them), cores, threads, library versions, GPU, load average. The CPU fields come from the validation
    fingerprint's reader (fairdeploy.validation.fingerprint.cpu_record)."""
    import torch

    from fairdeploy.validation.fingerprint import cpu_record

    cpu = cpu_record()
    info: dict[str, Any] = {
        "cpu_model": cpu["model"],
        "cpu_isa": cpu["isa"],
        "torch_cpu_capability": cpu["torch_capability"],
        "cpu_isa_limits": cpu["isa_limits"],
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average_1_5_15": load_average(),
        "device": str(device) if device is not None else None,
        "gpu": None,
    }
    for mod in ("torchvision", "onnxruntime", "onnx", "torch_pruning"):
        try:
            info[mod] = __import__(mod).__version__
        except ImportError:
            info[mod] = None
    try:
        import tensorrt

        info["tensorrt"] = tensorrt.__version__
    except ImportError:
        info["tensorrt"] = None
    if torch.cuda.is_available():
        idx = device.index if getattr(device, "type", "") == "cuda" and device.index is not None else 0
        props = torch.cuda.get_device_properties(idx)
        info["gpu"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                       "compute_capability": f"{props.major}.{props.minor}", "cuda": torch.version.cuda}
    return info


def describe_isa(isa: dict[str, bool] | None) -> str:
    """'ISA avx2 fma ... amx_int8' (the features present), or 'ISA unknown' where /proc/cpuinfo was not read."""
    return "ISA unknown" if isa is None else "ISA " + (" ".join(k for k, v in isa.items() if v) or "none of interest")


def describe_machine(info: dict[str, Any]) -> str:
    gpu = info["gpu"]["name"] if info.get("gpu") else "no GPU"
    return (f"{info['cpu_model']} ({describe_isa(info.get('cpu_isa'))}), {info['cpu_cores']} cores "
            f"({info['torch_threads']} torch threads), {gpu}; "
            f"torch {info['torch']}, onnxruntime {info.get('onnxruntime')}; load average {info['load_average_1_5_15']}")


def write_results(path: str | os.PathLike[str], benchmark: str, args: argparse.Namespace, machine_info: dict[str, Any],
                  results: Any, **extra: Any) -> Path:
    """Write {benchmark, created, args, machine, results, ...} as JSON (atomically)."""
    from fairdeploy.files.json_files import write_json

    out = Path(path)
    data = {"benchmark": benchmark, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "args": vars(args),
            "machine": machine_info, "load_average_at_end": load_average(), "results": results, **extra}
    write_json(out, data)
    return out


def jsonable(obj: Any) -> Any:
    """Dataclasses and tuples to plain JSON-able values."""
    if hasattr(obj, "to_dict"):
        return obj.to_dict()
    if hasattr(obj, "__dataclass_fields__"):
        return asdict(obj)
    return obj


# ------------------------------------------------------------------------------------------------------
# a small trained model on the synthetic data (shared by latency.py and fairness.py)
# ------------------------------------------------------------------------------------------------------

def synthetic_checkpoint(work: Path, seed: int, n_images: int, image_size: int, epochs: int, device: str,
                         arch: str = "resnet18", batch_size: int = 64, lr: float = 2e-3) -> tuple[Path, Path]:
    """(manifest.csv, checkpoint dir) of `arch` trained on synthetic biased data, made under `work` or reused
    from there when an earlier run with the same settings left them (the settings are in the folder name)."""
    from fairdeploy.data.manifest import read_manifest
    from fairdeploy.data.synth import SynthConfig, generate_synthetic
    from fairdeploy.models.checkpoint import SPEC_FILE
    from fairdeploy.training.loop import FitConfig
    from fairdeploy.training.train import train_model

    data_dir = work / f"synth-n{n_images}-s{image_size}-seed{seed}"
    manifest = data_dir / "manifest.csv"
    if not manifest.is_file():
        generate_synthetic(data_dir, SynthConfig(n_images=n_images, image_size=image_size, seed=seed))
    run = work / f"{arch}-e{epochs}-b{batch_size}-lr{lr:g}-{data_dir.name}"
    if not (run / "best" / SPEC_FILE).is_file():
        cfg = FitConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
        train_model(read_manifest(manifest), arch, run, cfg, image_size=image_size, device=device)
    return manifest, run / "best"
