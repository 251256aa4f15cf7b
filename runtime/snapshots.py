"""Snapshots and resume: no completed step is lost.

The journal is the record: a step counts once its line is written (before its update is applied
anywhere, since updates are deferred into the next step). Snapshots are only a shortcut: a
run resumes from the newest complete snapshot and replays the journal lines after it, then
continues with the same seeds and data order (both pure functions of the step), so the weights
after step T equal those of an uninterrupted run.

A snapshot is written into ``snapshots/step-NNNNNNNN.tmp`` and renamed when complete (rename is
atomic), with ``meta.json`` giving the journal position it corresponds to and the CRC-32 of its
weights file as written. A directory without the final name is ignored; one whose weights no
longer match their CRC-32 (damage that keeps the file's size and header: a flipped bit) is
moved aside by the launcher before a resume loads it (``changed_since_written``).
"""

from __future__ import annotations

import errno
import json
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

from zoplan.errors import ZoplanError
from zoplan.runtime import faults
from zoplan.fileio import read_text
from zoplan.runtime.journal import parse_journal


@dataclass
class ResumePoint:
    next_step: int  # the first step to run
    base: Path | None  # snapshot directory to load instead of the base model (None: base model)
    replay: list[dict]  # journal lines after the snapshot, to apply to it


# a snapshot's weights: a model's, or an adapter's (zoplan.runtime.tuning.ADAPTER_WEIGHTS)
WEIGHT_FILES = ("model.safetensors", "adapter_model.safetensors")


def snapshot_dir(out: Path, step: int) -> Path:
    return out / "snapshots" / f"step-{step:08d}"


def snapshots(out: Path, *, check: bool = False) -> list[tuple[int, Path]]:
    """Complete snapshots, oldest first. With ``check``, one whose weights are damaged (a truncated
    file, say) is left out with a warning: the run resumes from an earlier one and replays more
    of the journal, with the same result."""
    from zoplan.runtime.checkpoint import weight_shapes
    from zoplan.runtime.tuning import ADAPTER_WEIGHTS

    root = out / "snapshots"
    found = []
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.name.startswith("step-") and not d.name.endswith(".tmp"):
                if not (d / "meta.json").exists():  # (one is written last, before the snapshot's rename)
                    if check:
                        print(f"warning: snapshot {d.name} left out: it has no meta.json", file=sys.stderr, flush=True)
                    continue
                try:
                    meta = json.loads(read_text(d / "meta.json", "snapshot meta", 1 << 16))
                    step = meta.get("step") if isinstance(meta, dict) else None
                    if type(step) is not int or d.name != f"step-{step:08d}":
                        raise ZoplanError(f"its meta.json does not name step {d.name[5:]}")
                    if _recorded_crcs(meta) is None:
                        raise ZoplanError("its meta.json is damaged")
                    if check:  # the model's weights, or an adapter's (zoplan.runtime.tuning)
                        full = d / "model.safetensors"
                        weight_shapes([full if full.exists() else d / ADAPTER_WEIGHTS])
                except (ValueError, RecursionError, ZoplanError) as exc:
                    if check:
                        # (what a damaged checkpoint's message would fix, a resume does: it leaves it out)
                        reason = exc.message if isinstance(exc, ZoplanError) else "its meta.json is damaged"
                        print(f"warning: snapshot {d.name} left out: {reason}", file=sys.stderr, flush=True)
                    continue
                found.append((step, d))
    return sorted(found)


def _recorded_crcs(meta: dict) -> dict[str, int] | None:
    """The CRC-32 of each weights file as meta.json recorded it ({} for a snapshot written before
    they were recorded; None: not a record of that form)."""
    crcs = meta.get("crc32", {})
    if not isinstance(crcs, dict) or any(
        name not in WEIGHT_FILES or type(crc) is not int or not 0 <= crc < 1 << 32 for name, crc in crcs.items()
    ):
        return None
    return crcs


def file_crc32(path: Path) -> int:
    """The CRC-32 of a file's bytes (zlib's: ~2 GB/s on one core, read in 16 MiB pieces)."""
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def weight_crcs(folder: Path) -> dict[str, int]:
    """The CRC-32 of each weights file in ``folder``, for its meta.json."""
    return {name: file_crc32(folder / name) for name in WEIGHT_FILES if (folder / name).is_file()}


def changed_since_written(folder: Path) -> str | None:
    """Why the weights of snapshot ``folder`` (one ``snapshots`` found) are not what was written:
    a file whose CRC-32 differs from meta.json's, or that is gone; None when they are (or the
    snapshot was written before CRCs were recorded)."""
    meta = json.loads(read_text(folder / "meta.json", "snapshot meta", 1 << 16))
    for name, crc in sorted((_recorded_crcs(meta) or {}).items()):
        path = folder / name
        if not path.is_file():
            return f"its {name} is gone"
        if file_crc32(path) != crc:
            return f"its {name} is not what was written (its CRC-32 differs from the one its meta.json recorded)"
    return None


def read_valid_journal(path: Path) -> list[dict]:
    """The journal's complete lines, checked as replay checks them (zoplan.runtime.replay); a torn
    last line (a crash or power loss mid-write) is cut off the file so that appending continues
    cleanly. A damaged line elsewhere is a refusal: the run must not retrain from there silently."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    rows, good = parse_journal(raw, path, first=0, keep_unterminated=False)
    if good < len(raw):
        with path.open("r+b") as f:
            f.truncate(good)
    return rows


def cut_torn_tail(path: Path) -> None:
    """Drop an unterminated last line (an append cut by a crash) so the next append starts clean."""
    if not path.exists():
        return
    raw = path.read_bytes()
    keep = raw.rfind(b"\n") + 1
    if keep < len(raw):
        with path.open("r+b") as f:
            f.truncate(keep)


def resume_point(out: Path, journal: list[dict] | None = None) -> ResumePoint:
    """Where a run in ``out`` starts: after the journal's last step (``journal``: node 0's, on the
    other machines of a run; else ``out``'s own), from ``out``'s newest snapshot of no later step."""
    if journal is None:
        journal = read_valid_journal(out / "journal.jsonl")
    done = len(journal)
    usable = [(s, d) for s, d in snapshots(out, check=True) if s <= done]
    if usable:
        step, base = usable[-1]
        return ResumePoint(done, base, journal[step:done])
    return ResumePoint(done, None, journal)


# a write that failed for its disk (full, over quota, read-only): error.json's kind "disk"
DISK_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


class DiskFull(ZoplanError):
    """A snapshot that could not be written for a full or read-only disk (error.json's kind "disk")."""


def write_snapshot(out: Path, step: int, save, keep: int, rank: int = 0) -> Path:
    """``save(directory)`` writes the weights; the snapshot becomes visible only when complete.
    Older snapshots beyond ``keep`` are removed afterwards."""
    final = snapshot_dir(out, step)
    tmp = final.with_name(final.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        faults.hit("fail-snapshot", rank, step)  # (each node's first rank writes its snapshots)
        save(tmp)
        (tmp / "meta.json").write_text(json.dumps({"step": step, "crc32": weight_crcs(tmp)}))
        if final.exists():  # written before the journal was cut back to an earlier step: redone
            shutil.rmtree(final)
        tmp.rename(final)
    except ZoplanError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        last = snapshots(out)
        kept = f"snapshot {last[-1][1].name}" if last else "no earlier snapshot"
        disk = exc.errno in DISK_ERRNOS
        cause = "free disk space" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else f"make {out} writable"
        raise (DiskFull if disk else ZoplanError)(
            f"writing the snapshot of step {step} failed: {exc}; the run stopped, {kept} and the journal are intact",
            fix=f"{cause}, then continue with `zoplan run --resume {out}`",
        ) from None
    for _, old in snapshots(out)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final
