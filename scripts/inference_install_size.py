"""Installed size of an inference-only device on arm64, from the aarch64 wheels a Pi downloads.

    .venv/bin/python scripts/inference_install_size.py [--out FILE]

For each of fedge's inference extras (`inference`: numpy runs the ONNX file;
`inference-onnxruntime`: ONNX Runtime does), installs the extra's packages
from PyPI with `pip install --target DIR --platform manylinux_2_28_aarch64
--only-binary=:all:` (the same wheels `pip install` picks on Raspberry Pi OS
64-bit, Python 3.11), plus fedge itself (`--no-deps`), twice: as pip installs
by default (bytecode compiled) and with `--no-compile` (Python then caches
bytecode only for the modules it imports). Prints one JSON object: bytes on
disk per top-level entry, summed per distribution, pip and setuptools (what
`python -m venv` brings) not included since they are not installed here.
A set-up-time tool: it downloads from PyPI, so it is not part of `./run test`;
bench/onnx_bench.py measures the same closure offline from this venv.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_17_aarch64", "manylinux2014_aarch64")
EXTRAS = ("inference", "inference-onnxruntime")


def requirements(extra: str) -> list[str]:
    """The extra's requirements from pyproject.toml, `fedge[other]` expanded."""
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"]
    out: list[str] = []
    for r in extras[extra]:
        if r.startswith("fedge["):
            for other in r[len("fedge["):r.index("]")].split(","):
                out += requirements(other.strip())
        else:
            out.append(r)
    return out


def _tree_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() \
        else path.stat().st_size


def install(extra: str, target: Path, *, compile_: bool) -> dict[str, object]:
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
           "--target", str(target)]
    if not compile_:
        pip.append("--no-compile")
    plat = [f"--platform={p}" for p in PLATFORMS]
    subprocess.run([*pip, *plat, "--python-version", "3.11", "--implementation", "cp",
                    "--abi", "cp311", "--only-binary=:all:", *requirements(extra)], check=True)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True, capture_output=True)
    by_dist: dict[str, int] = {}
    owner: dict[str, str] = {}
    for info in target.glob("*.dist-info"):
        dist = info.name.split("-")[0].lower().replace("_", "-")
        for line in (info / "RECORD").read_text().splitlines():
            top = line.split(",")[0].split("/")[0]
            owner.setdefault(top, dist)
    for entry in target.iterdir():
        dist = owner.get(entry.name, "(unowned)")
        if entry.name.endswith(".dist-info"):
            dist = entry.name.split("-")[0].lower().replace("_", "-")
        by_dist[dist] = by_dist.get(dist, 0) + _tree_bytes(entry)
    pyc = sum(p.stat().st_size for p in target.rglob("*.pyc"))
    return {
        "mb": round(sum(by_dist.values()) / 1e6, 1),
        "pyc_mb": round(pyc / 1e6, 1),
        "by_package_mb": {k: round(v / 1e6, 1)
                          for k, v in sorted(by_dist.items(), key=lambda kv: -kv[1])},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, help="also write the JSON object here")
    ap.add_argument("--requirements", metavar="EXTRA", choices=EXTRAS,
                    help="only print the extra's requirements, one a line (scripts/pi-emulate)")
    args = ap.parse_args()
    if args.requirements:
        print("\n".join(requirements(args.requirements)))
        return
    result: dict[str, object] = {"platform": "aarch64 (manylinux wheels, cp311)"}
    for extra in EXTRAS:
        for compiled in (True, False):
            with tempfile.TemporaryDirectory() as tmp:
                key = extra if compiled else f"{extra}:no-compile"
                result[key] = install(extra, Path(tmp), compile_=compiled)
                print(f"{key}: {result[key]['mb']} MB", file=sys.stderr)  # type: ignore[index]
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
