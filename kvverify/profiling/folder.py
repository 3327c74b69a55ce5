"""A report folder written all at once: the files go to a temporary folder next to it and are moved into place
only when every one of them is written.

A run that fails midway leaves the folder as it was. A run into a folder that holds an earlier report replaces
that report's files and removes those the new one does not write (plots of a preset no longer measured, a CUDA
snapshot), found by the list of files each report leaves in :data:`MANIFEST`; every other file in the folder is
left alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

#: The list of files the report wrote, kept in the folder so the next report knows what it replaces.
MANIFEST = ".kvverify-report.json"


class ReportFolderError(Exception):
    """The report folder cannot be written; the message names the folder, what is wrong and what to do."""


def prepare(out_dir: Path) -> None:
    """Raise :class:`ReportFolderError` now, before anything is measured, when ``out_dir`` cannot take a report."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ReportFolderError(f"--out {out_dir}: exists and is not a folder; expected a folder (new or existing) "
                                "for the report. Pass another path or move the file away.")
    try:
        out_dir.resolve().parent.mkdir(parents=True, exist_ok=True)
        probe = tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".check", dir=out_dir.resolve().parent)
        os.rmdir(probe)
    except OSError as error:
        raise ReportFolderError(f"--out {out_dir}: cannot write next to it ({error.strerror or error}); expected a "
                                "writable parent folder. Pass a path you can write to.") from None


@contextmanager
def staged(out_dir: Path, owned: Callable[[str], bool], keep: Iterable[str] = ()) -> Iterator[Path]:
    """A new, empty folder next to ``out_dir`` to write the report into; when the block ends without an error,
    its files replace the earlier report's in ``out_dir``. The temporary folder is removed in every case.

    owned(name): whether a file is the report's own, for folders written before :data:`MANIFEST` existed.
    keep: names of files already in ``out_dir`` that belong to the new report (a snapshot written beside it).
    """
    prepare(out_dir)
    parent = out_dir.resolve().parent
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".partial", dir=parent))
    umask = os.umask(0o022)
    os.umask(umask)
    stage.chmod(0o777 & ~umask)  # mkdtemp's 0o700 would become the report folder's mode
    try:
        yield stage
        publish(stage, out_dir, owned, keep)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def publish(stage: Path, out_dir: Path, owned: Callable[[str], bool], keep: Iterable[str] = ()) -> None:
    """Move the files of ``stage`` into ``out_dir``: the whole folder at once when ``out_dir`` is new, else file by
    file (each an atomic rename), then remove the earlier report's files that the new one lacks."""
    new = sorted(p.name for p in stage.iterdir() if p.is_file() and p.name != MANIFEST)
    kept = [name for name in keep if name not in new and (out_dir / name).is_file()]
    _write_manifest(stage, [*new, *kept])
    if not out_dir.exists():
        os.replace(stage, out_dir)
        return
    earlier = _earlier_files(out_dir, owned)
    for name in new:
        os.replace(stage / name, out_dir / name)
    for name in sorted(earlier - {*new, *kept}):
        (out_dir / name).unlink(missing_ok=True)
    os.replace(stage / MANIFEST, out_dir / MANIFEST)


def _write_manifest(folder: Path, names: list[str]) -> None:
    (folder / MANIFEST).write_text(json.dumps({"files": names}, indent=1) + "\n", encoding="utf-8")


def _earlier_files(out_dir: Path, owned: Callable[[str], bool]) -> set[str]:
    """The files of the report already in ``out_dir``: those its manifest lists, else those ``owned`` claims;
    in both cases only plain file names the report could have written."""
    try:
        listed = json.loads((out_dir / MANIFEST).read_text(encoding="utf-8"))["files"]
        names = {name for name in listed if isinstance(name, str)}
    except (OSError, ValueError, KeyError, TypeError):
        names = {p.name for p in out_dir.iterdir()}
    return {name for name in names if Path(name).name == name and owned(name) and (out_dir / name).is_file()}
