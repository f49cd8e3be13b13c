"""Render the PlantUML diagrams in images/ to PNG and SVG (``make docs``).

Offline, with Debian's ``plantuml`` and ``graphviz`` (``make docs`` installs them when missing).
Shows each diagram as it goes, stops at the first one PlantUML cannot render (its error names
the line), and writes ``diagrams.sha256`` with the checksum of every source and picture:
``tests/unit/test_diagrams.py`` uses it to check that the pictures come from the current
sources.

    python3 images/render.py [NAME ...]     # default: every images/*.puml
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import time
from pathlib import Path

IMAGES = Path(__file__).resolve().parent
STAMP = IMAGES / "diagrams.sha256"
FORMATS = ("png", "svg")
TOOLS = {"plantuml": "plantuml", "dot": "graphviz"}  # command → Debian package


def sha256(path: Path) -> str:
    """Hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def missing_tools() -> list[str]:
    """The commands PlantUML rendering needs that are not on PATH."""
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def render(source: Path) -> None:
    """``source`` (.puml) → .png and .svg beside it; SystemExit naming the error on failure."""
    for fmt in FORMATS:
        # -nometadata: no source copy, PlantUML or Java version in the files, so the same
        # source gives the same picture on every machine.
        proc = subprocess.run(["plantuml", "-nometadata", "-failfast2", f"-t{fmt}",
                               str(source)], capture_output=True, text=True)
        out = source.with_suffix(f".{fmt}")
        if proc.returncode != 0 or not out.is_file():
            message = (proc.stderr or proc.stdout).strip() or f"exit status {proc.returncode}"
            raise SystemExit(f"docs: PlantUML could not render {source.name} as {fmt}:\n"
                             f"{message}")


def write_stamp(rendered: list[Path]) -> None:
    """``diagrams.sha256`` (sha256sum's format): new checksums for the sources just rendered
    and their pictures; the lines of the other diagrams are kept as they were, so a source
    edited but not rendered still shows as out of date."""
    entries: dict[str, str] = {}
    if STAMP.is_file():
        for line in STAMP.read_text().splitlines():
            digest, _, name = line.partition("  ")
            entries[name] = digest
    for source in rendered:
        for path in (source, *(source.with_suffix(f".{fmt}") for fmt in FORMATS)):
            entries[path.name] = sha256(path)
    STAMP.write_text("".join(f"{entries[name]}  {name}\n" for name in sorted(entries)))


def main(argv: list[str]) -> int:
    """Render the named diagrams (default: all), then rewrite the checksum file."""
    missing = missing_tools()
    if missing:
        packages = " ".join(TOOLS[tool] for tool in missing)
        print(f"docs: {', '.join(missing)} not found: install Debian's {packages} "
              f"(`make docs` does it as root or through sudo -n, or: sudo apt-get install "
              f"{packages})", file=sys.stderr)
        return 1
    every = sorted(IMAGES.glob("*.puml"))
    wanted = [IMAGES / f"{Path(name).stem}.puml" for name in argv] or every
    for source in wanted:
        if not source.is_file():
            print(f"docs: no such diagram source: {source}", file=sys.stderr)
            return 1
    for i, source in enumerate(wanted, 1):
        began = time.monotonic()
        print(f"[{i}/{len(wanted)}] {source.name} ...", end=" ", flush=True)
        render(source)
        print(f"{', '.join(source.with_suffix('.' + f).name for f in FORMATS)} "
              f"({time.monotonic() - began:.1f} s)", flush=True)
    write_stamp(wanted)
    print(f"docs: {len(wanted)} diagram(s) rendered; checksums in {STAMP.name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
