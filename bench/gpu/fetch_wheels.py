"""Download the wheels the bare GPU machine lacks, pinned to the versions installed here, and print their size.

Run it with the Python of the environment poft's pyproject resolved to (`make` builds .venv), from the
repository root:

    .venv/bin/python bench/gpu/fetch_wheels.py              # .whl/, CPython 3.12 manylinux x86_64

The machine's packages are listed in bench/gpu/image.txt (NAME or NAME==VERSION). What it lacks is poft's
dependency closure, walked through the installed metadata, less the image's packages and everything they
depend on; a package whose version on the image is older than the one resolved here travels too
(transformers). `--python-version 3.11 --dest .whl/py311` fetches the same versions for the local
simulation (bench/gpu/simulate.sh).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")


def read_image(path: Path) -> dict[str, Version | None]:
    """The image's packages: canonical name -> version (None where the version is not known)."""
    image = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            image[canonicalize_name(name)] = Version(version) if version else None
    return image


def requirements(name: str, python_version: str) -> list[Requirement]:
    """Installed dependencies of `name` that apply without extras on the target Python."""
    environment = {"python_version": python_version, "python_full_version": f"{python_version}.0", "extra": ""}
    try:
        found = [Requirement(spec) for spec in metadata.requires(name) or []]
    except metadata.PackageNotFoundError:  # an image package not installed here (triton on CPU): a leaf
        return []
    return [r for r in found if r.marker is None or r.marker.evaluate(environment)]


def closure(roots: list[Requirement], python_version: str, stop: set[str]) -> dict[str, list[Requirement]]:
    """`roots` and their dependencies, not descending into `stop`: name -> every requirement on it."""
    edges: dict[str, list[Requirement]] = {}
    todo = list(roots)
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in stop:
            continue
        if name not in edges:
            todo += requirements(name, python_version)
        edges.setdefault(name, []).append(requirement)
    return edges


def accepts(requirement: Requirement, version: Version) -> bool:
    """Whether an image version fits; X.Y stands for some X.Y.z, so it fits where any X.Y.z might."""
    candidates = [version] + ([Version(f"{version}.9999")] if len(version.release) < 3 else [])
    return any(requirement.specifier.contains(c, prereleases=True) for c in candidates)


def missing_packages(image: dict[str, Version | None], python_version: str) -> dict[str, str]:
    """name -> version installed here, for every package poft needs that the image lacks or has too old.

    An image package is too old where its version fails a requirement of poft or of a package poft needs;
    what it depends on is on the image all the same.
    """
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    roots = [Requirement(spec) for spec in project["dependencies"]]
    edges = closure(roots, python_version, set())
    outdated = {n for n, v in image.items() if v is not None and not all(accepts(r, v) for r in edges.get(n, []))}
    present = set(closure([Requirement(name) for name in image], python_version, set())) - outdated
    needed = set(closure(roots, python_version, present))
    try:
        return {name: metadata.version(name) for name in sorted(needed)}
    except metadata.PackageNotFoundError as error:
        raise SystemExit(
            f"{error.name} is not installed in {sys.prefix}: run this with the Python poft is installed in"
        ) from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", type=Path, default=ROOT / "bench/gpu/image.txt")
    parser.add_argument("--dest", type=Path, default=ROOT / ".whl")
    parser.add_argument("--python-version", default="3.12")
    parser.add_argument("--dry-run", action="store_true", help="list the wheels without downloading them")
    args = parser.parse_args()
    needed = missing_packages(read_image(args.image), args.python_version)
    pins = [f"{name}=={version}" for name, version in needed.items()]
    print("the GPU machine lacks:", " ".join(pins))
    if args.dry_run:
        return
    args.dest.mkdir(parents=True, exist_ok=True)
    for stale in args.dest.glob("*.whl"):
        stale.unlink()
    platforms = [f"--platform={p}" for p in PLATFORMS]
    target = ["--python-version", args.python_version, "--implementation", "cp", *platforms]
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", *target]
    subprocess.run([*command, "-d", str(args.dest), *pins], check=True)
    wheels = sorted(args.dest.glob("*.whl"))
    total = sum(w.stat().st_size for w in wheels)
    for wheel in wheels:
        print(f"{wheel.stat().st_size / 2**20:8.2f} MiB  {wheel.name}")
    print(f"{total / 2**20:8.2f} MiB  in {len(wheels)} wheels, {args.dest}")


if __name__ == "__main__":
    main()
