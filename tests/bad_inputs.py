"""Hostile and clumsy inputs for the bad-input corpus (tests/test_bad_inputs.py): tiny videos that are
broken in one way each, broken images, and folders that cannot be written."""

from __future__ import annotations

import os
import struct
import subprocess
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import numpy as np


def _noise(i: int, width: int, height: int) -> np.ndarray:
    blocks = np.random.default_rng(i).integers(40, 255, (max(height // 8, 1), max(width // 8, 1), 3), dtype=np.uint8)
    return np.kron(blocks, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]


def _encode(container, stream, pictures: Iterator[np.ndarray]) -> None:
    import av

    for image in pictures:
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_video(path: Path, width: int, height: int, frames: int, *, picture: Optional[Callable[[int], np.ndarray]] = None,
                codec: str = "libx264", pix_fmt: str = "yuv420p", fps: int = 8, rotation: int = 0) -> Path:
    """A short video; frames are `picture(i)` (RGB) or moving noise blocks (never uniform, never black);
    `rotation`: the display matrix's counter-clockwise degrees (a phone clip)."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
        if rotation:
            stream.set_display_rotation(rotation)
        _encode(container, stream, ((picture or (lambda i: _noise(i, width, height)))(i) for i in range(frames)))
    return path


def write_cover_first(path: Path) -> Path:
    """A Matroska file whose first video stream is a 64x40 two-frame 'cover', the second the 160x96 episode."""
    import av

    with av.open(str(path), "w") as container:
        cover, main = container.add_stream("libx264", rate=8), container.add_stream("libx264", rate=8)
        cover.width, cover.height, cover.pix_fmt = 64, 40, "yuv420p"
        main.width, main.height, main.pix_fmt = 160, 96, "yuv420p"
        _encode(container, cover, (_noise(i, 64, 40) for i in range(2)))
        _encode(container, main, (_noise(100 + i, 160, 96) for i in range(16)))
    return path


def write_audio_only(path: Path) -> Path:
    """A container holding one second of silence and no video stream."""
    import av

    with av.open(str(path), "w") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 8000), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_png_bomb(path: Path, side: int = 20000) -> Path:
    """A PNG that claims `side` x `side` pixels (a decompression bomb) in a few hundred bytes."""
    header = _chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
    rows = zlib.compress(b"\0" * 4096)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + header + _chunk(b"IDAT", rows) + _chunk(b"IEND", b""))
    return path


def write_corrupt_png(path: Path, good: Path) -> Path:
    """A real PNG's signature and header followed by garbage."""
    data = good.read_bytes()
    path.write_bytes(data[:40] + bytes(range(256)) * 4)
    return path


@contextmanager
def small_disk(folder: Path, size: str = "192k") -> Iterator[str]:
    """`folder` as a tiny tmpfs (yields "tmpfs"), or, where mounting is not allowed, a plain folder
    for a process limited by RLIMIT_FSIZE (yields "rlimit")."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0 if os.geteuid() == 0 else False
    try:
        yield "tmpfs" if mounted else "rlimit"
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


@contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """`folder` read-only: a read-only tmpfs for root (who ignores permissions), mode 0555 otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(folder)], check=True)
        try:
            yield
        finally:
            subprocess.run(["umount", str(folder)], check=True)
    else:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
