"""Fetch the pages' static files (requirements/static.txt) from the npm registry.

Each package's tarball is checked against the sha512 integrity the line gives before any
file of it is written; the named files land in src/tunelab/server/static/vendor/NAME/
(written beside, then renamed). Files already there with the right version are kept.

    python tools/fetch_static.py [--registry URL] [--cache DIR]
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements" / "static.txt"
TARGET = ROOT / "src" / "tunelab" / "server" / "static" / "vendor"


def entries() -> list[tuple[str, str, str, list[str]]]:
    found = []
    for line in LOCK.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.startswith("#"):
            name, version, integrity, *files = line.split()
            found.append((name, version, integrity, files))
    return found


def tarball(registry: str, name: str, version: str, cache: Path | None) -> bytes:
    file = f"{name.split('/')[-1]}-{version}.tgz"
    if cache is not None and (cache / file).is_file():
        return (cache / file).read_bytes()
    with urllib.request.urlopen(f"{registry}/{name}/-/{file}", timeout=60) as answer:
        data = answer.read()
    if cache is not None:
        cache.mkdir(parents=True, exist_ok=True)
        (cache / file).write_bytes(data)
    return data


def fetch(registry: str, cache: Path | None) -> None:
    for name, version, integrity, files in entries():
        folder = TARGET / name
        stamp = folder / ".version"
        if stamp.is_file() and stamp.read_text().strip() == f"{version} {integrity}":
            continue
        data = tarball(registry, name, version, cache)
        algorithm, _, expected = integrity.partition("-")
        digest = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
        if digest != expected:
            sys.exit(f"{name} {version}: the tarball's {algorithm} is {digest}, not {expected}")
        TARGET.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=TARGET))
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
            for wanted in files:
                member = tar.extractfile(f"package/{wanted}")
                if member is None:
                    sys.exit(f"{name} {version}: no file {wanted} in the package")
                (staging / Path(wanted).name).write_bytes(member.read())
        (staging / ".version").write_text(f"{version} {integrity}\n")
        staging.chmod(0o755)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(staging, folder)
        print(f"static: {name} {version}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default="https://registry.npmjs.org")
    parser.add_argument("--cache", type=Path, help="keep (and reuse) the tarballs here")
    args = parser.parse_args()
    fetch(args.registry.rstrip("/"), args.cache)


if __name__ == "__main__":
    main()
