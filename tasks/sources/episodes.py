"""Episodes as a source: which video files a run's inputs name, their episode ids, and whether each
can be read at all (found without opening it)."""

from __future__ import annotations

import errno
import glob
import os
import stat
from pathlib import Path

from tasks.run.store import safe_name, storable_text
from tasks.sources.ingest import IMAGE_SUFFIXES

VIDEO_SUFFIXES = (".mp4", ".mkv", ".avi", ".webm", ".mov", ".m4v", ".ts", ".m2ts", ".flv", ".wmv", ".mpg", ".mpeg")


def normalize_inputs(inputs: list[str]) -> list[str]:
    """Each input (file, folder or glob) as an absolute path, so `resume` works from any folder;
    the same path spelled twice (`a.mp4`, `./x/../a.mp4`, a link to it) is kept once."""
    kept: dict[str, str] = {}
    for text in inputs:
        absolute = os.path.abspath(os.path.expanduser(str(text)))
        kept.setdefault(os.path.realpath(absolute), absolute)
    return list(kept.values())


def _matches(text: str) -> list[Path]:
    path = Path(text).expanduser()
    try:
        if path.is_dir():  # any file named like a video (a FIFO, a device, a dangling link: quarantined)
            return sorted(p for p in path.rglob("*") if (p.is_symlink() or not p.is_dir())
                          and p.suffix.lower() in VIDEO_SUFFIXES)
        if path.is_file():  # a FIFO or a device given by name matches nothing: quarantined, or refused when alone
            return [path]
    except OSError:  # e.g. a name longer than the system allows: it matches nothing
        return []
    return sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())


def missing_inputs(inputs: list[str]) -> list[str]:
    """The inputs that match no video file (the frames stage quarantines them)."""
    return [text for text in inputs if not _matches(text)]


def discover_videos(inputs: list[str]) -> list[Path]:
    """Expand video files, folders of videos and globs into a sorted list of files, each file once.

    An input that matches nothing stays in the list as itself (the stage quarantines it: it cannot be
    read); FileNotFoundError naming the inputs when none matches anything (and, for a folder of
    images, the command that takes images).
    """
    found: list[Path] = []
    missing: list[str] = []
    for text in inputs:
        matches = _matches(text)
        if not matches:
            missing.append(text)
        found.extend(m.absolute() for m in matches or [Path(text).expanduser()])
    if len(missing) == len(inputs):
        raise FileNotFoundError("; ".join(f"input '{t}' matched no video files{_images_hint(Path(t).expanduser())}"
                                          for t in missing) or "no inputs given")
    unique: dict[str, Path] = {}
    for video in found:
        unique.setdefault(os.path.realpath(video), video)
    return sorted(unique.values())


def _images_hint(path: Path) -> str:
    """When a folder holds images but no videos: which command takes images."""
    if path.is_dir() and any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in path.rglob("*")):
        return (f"; it holds images: for a folder of images use `episode2lora renders {path}` (product renders, "
                f"one folder per character) or `episode2lora photos {path}` (photo sets with captions)")
    return ""


def episode_ids(videos: list[Path], known: dict[str, str] | None = None) -> list[str]:
    """Stable, path-safe episode ids from file names (suffixed when two names collide).

    `known` maps a video (as stored, `storable_text`) to the id it already has in the run: that id
    never changes, so an added episode whose name collides takes the suffix.
    """
    known = {video: episode for video, episode in (known or {}).items()
             if video in {storable_text(v) for v in videos}}
    taken = set(known.values())
    ids: list[str] = []
    for video in videos:
        candidate = known.get(storable_text(video))
        if candidate is None:
            base = safe_name(video.stem)
            candidate, n = base, 2
            while candidate in taken:
                candidate, n = f"{base}-{n}", n + 1
            taken.add(candidate)
        ids.append(candidate)
    return ids


_KINDS = {stat.S_IFIFO: "a named pipe (FIFO)", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket"}


def unreadable(video: Path) -> str | None:
    """Why `video` cannot be read as a video file, found without opening it (a FIFO would block);
    None for a regular file that is not empty."""
    try:
        st = video.stat()
    except OSError as exc:
        if exc.errno == errno.ENAMETOOLONG:
            return "missing: the path is longer than the system allows"
        what = "a dangling or looping link" if video.is_symlink() else "no such file (or a folder or glob without videos)"
        return f"missing: {what}"
    if stat.S_ISDIR(st.st_mode):
        return "no such file: a folder (holding no video) named like one"
    if not stat.S_ISREG(st.st_mode):
        return f"not a regular file: {_KINDS.get(stat.S_IFMT(st.st_mode), 'a special file')}; only video files are read"
    if st.st_size == 0:
        return "empty file (0 bytes)"
    return None


def file_stamp(video: Path) -> tuple[int, int]:
    """(size, mtime_ns) of a file, to tell whether it changed while it was read."""
    st = video.stat()
    return st.st_size, st.st_mtime_ns


def changed_since(video: Path, expected: tuple[int, int]) -> str | None:
    """'changed while read ...' when the file's size or mtime is no longer `expected`."""
    try:
        now = file_stamp(video)
    except OSError:
        return "changed while read: the file is gone; resume the run once it is back"
    if tuple(now) == tuple(expected):
        return None
    return (f"changed while read (size {expected[0]} -> {now[0]} bytes): still being written? "
            "resume the run once the file is complete")
