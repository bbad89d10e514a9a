"""Used while building the images (see the Dockerfile): fairdeploy's runtime requirements without those the base
image already provides or that the image replaces, and pip constraints pinning what the base provides.

Run after `pip install --no-deps .`; it reads the installed fairdeploy's metadata (pyproject.toml's
`dependencies`), so the list is never written twice:

    python base_requirements.py requirements.txt constraints.txt --provided torch torchvision \
        --replaced onnxruntime --pin tensorrt numpy

--provided  must be installed already (the base's CUDA build of torch): left out of the requirements and pinned.
--replaced  left out of the requirements (onnxruntime: the image installs onnxruntime-gpu instead; with both
            installed, the CPU package's files hide the CUDA provider). The Jetson image replaces nothing: PyPI has
            no aarch64 onnxruntime-gpu, so it keeps PyPI's CPU onnxruntime (the Dockerfile says where the GPU
            build for JetPack comes from).
--pin       pinned to the installed version when installed (tensorrt, numpy from the base), skipped otherwise.

Then `pip install -r requirements.txt -c constraints.txt ...` cannot reinstall or upgrade anything pinned.
"""

from __future__ import annotations

import argparse
import re
import sys
from importlib import metadata
from pathlib import Path

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_EXTRA = re.compile(r"\bextra\s*==")


def canonical(name: str) -> str:
    """PEP 503 normalised name: case, '-', '_' and '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    match = _NAME.match(requirement.strip())
    if not match:
        raise ValueError(f"cannot read a package name from requirement {requirement!r}")
    return canonical(match.group())


def runtime_requirements(requires: list[str], leave_out: set[str]) -> list[str]:
    """The requirements that are not extras' and whose package is not in `leave_out` (canonical names)."""
    return [r for r in requires if not _EXTRA.search(r) and requirement_name(r) not in leave_out]


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("requirements", type=Path)
    parser.add_argument("constraints", type=Path)
    parser.add_argument("--provided", nargs="*", default=[])
    parser.add_argument("--replaced", nargs="*", default=[])
    parser.add_argument("--pin", nargs="*", default=[])
    parser.add_argument("--package", default="fairdeploy")
    args = parser.parse_args(argv)

    requires = metadata.requires(args.package) or []
    pins: list[str] = []
    for name in args.provided:
        version = installed_version(name)
        if version is None:
            print(f"error: the base image has no {name}; this stage expects its own build of it", file=sys.stderr)
            return 1
        pins.append(f"{name}=={version}")
    for name in args.pin:
        version = installed_version(name)
        if version is not None:
            pins.append(f"{name}=={version}")
    leave_out = {canonical(n) for n in (*args.provided, *args.replaced)}
    reqs = runtime_requirements(requires, leave_out)
    args.requirements.write_text("".join(f"{r}\n" for r in reqs))
    args.constraints.write_text("".join(f"{p}\n" for p in pins))
    print(f"{args.requirements}: {len(reqs)} requirements; {args.constraints}: {', '.join(pins) or 'none'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
