"""Reading frames out of a video file with PyAV: the main stream, packet-by-packet decoding that
skips frames nobody needs, and cheap views of a decoded frame (a thumbnail for cut detection, its
grey values from the luma plane, its display rotation)."""

from __future__ import annotations

from typing import Any, Callable, Iterator

import cv2
import numpy as np

MEASURE_WIDTH = 480
"""Frames wider than this are measured (sharpness, perceptual hash) at this width."""

_PLANAR_YUV = {"yuv420p", "yuvj420p", "yuv422p", "yuvj422p", "yuv444p", "yuvj444p"}
_TV_TO_FULL = np.clip(np.round((np.arange(256) - 16) * 255 / 219), 0, 255).astype(np.uint8)
"""Limited-range (16-235) luma to the 0-255 scale the thresholds are set in."""


def at_width(gray: np.ndarray, width: int = MEASURE_WIDTH) -> np.ndarray:
    """`gray` shrunk to `width` columns (unchanged when it is not wider)."""
    if gray.shape[1] > width:
        return cv2.resize(gray, (width, round(gray.shape[0] * width / gray.shape[1])), interpolation=cv2.INTER_AREA)
    return gray


def thumbnail(frame, columns: int = 48) -> np.ndarray:
    """A tiny int16 view of a decoded frame for cut detection (about `columns` wide, Y+U+V).

    Planar 8-bit YUV frames are subsampled straight from their planes (no colour conversion,
    this runs on every decoded frame); other formats go through swscale.
    """
    if frame.format.name in _PLANAR_YUV:
        parts = []
        for plane in frame.planes:
            rows = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
            step = max(1, plane.width // columns)
            parts.append(rows[step // 2 :: step, step // 2 :: step].ravel())
        return np.concatenate(parts).astype(np.int16)
    small = frame.reformat(width=columns, height=max(1, columns * frame.height // max(1, frame.width)), format="yuv444p")
    return np.concatenate([np.asarray(p).ravel() for p in small.to_ndarray(channel_last=False)]).astype(np.int16)


def luma(frame, width: int = MEASURE_WIDTH) -> np.ndarray:
    """A decoded frame's grey values at `width` columns, read from its luma plane when it has one
    (no colour conversion: dropped candidates are never converted to RGB), else via BGR."""
    if frame.format.name in _PLANAR_YUV:
        plane = frame.planes[0]
        y = np.frombuffer(plane, np.uint8).reshape(plane.height, plane.line_size)[:, : plane.width]
        small = at_width(y, width)
        full = frame.format.name.startswith("yuvj") or getattr(frame, "color_range", 0) == 2  # 2: JPEG (full) range
        return small if full else cv2.LUT(np.ascontiguousarray(small), _TV_TO_FULL)
    return at_width(cv2.cvtColor(frame.to_ndarray(format="bgr24"), cv2.COLOR_BGR2GRAY), width)


def quarter_turns(frame) -> int:
    """Quarter turns (counter-clockwise) a decoded frame's display matrix asks for (phone clips)."""
    return round((getattr(frame, "rotation", 0) or 0) / 90) % 4


def turn_upright(image: np.ndarray, turns: int) -> np.ndarray:
    """`image` (a decoded frame's pixels) turned as the frame is meant to be shown."""
    return np.ascontiguousarray(np.rot90(image, turns)) if turns else image


def main_stream(container) -> Any:
    """The main video stream: the largest one that is not an attached picture (a cover); None if none."""
    from av.stream import Disposition

    streams = [s for s in container.streams.video if not s.disposition & Disposition.attached_pic]
    return max(streams, key=lambda s: (s.codec_context.width or 0) * (s.codec_context.height or 0), default=None)


def error_text(exc: BaseException) -> str:
    """An exception as one short line: its type and message."""
    text = str(exc).strip() or type(exc).__name__
    return f"{type(exc).__name__}: {text}"[:300]


def decoded_frames(container, stream, report: dict, wanted: Callable[[Any], bool] | None = None) -> Iterator[Any]:
    """The frames of `stream`, packet by packet, in decode order.

    `wanted(packet)`, asked before each packet is decoded: False decodes its frame only when other
    frames reference it (skip_frame NONREF), so it may not be yielded. A packet that fails to decode
    adds one to `report["decode_errors"]`; a container that fails to demux (truncated, corrupt) ends
    the frames there, with `report["reason"]` saying so.
    """
    import av

    packets = container.demux(stream)
    while True:
        try:
            packet = next(packets)
        except StopIteration:
            return
        except av.error.FFmpegError as exc:  # truncated or corrupt container: keep what was read
            report["decode_errors"] += 1
            report["reason"] = f"stream ends early: {error_text(exc)}"
            return
        if wanted is not None:
            stream.codec_context.skip_frame = "DEFAULT" if wanted(packet) else "NONREF"
        try:
            frames = packet.decode()
        except av.error.FFmpegError:
            report["decode_errors"] += 1
            continue
        yield from frames
