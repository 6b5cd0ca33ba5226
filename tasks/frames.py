"""Stage `frames`: sample frames from episode videos, scene-aware and deduplicated.

Per episode (one shard each) the video is decoded in-process (tasks/decode.py); shots are found by
cut detection on tiny thumbnails of every decoded frame; frames are sampled every N seconds, at
key frames, or per shot (at most K per shot), and frames that can be neither a sample nor a
reference of one are not decoded at all; black, uniform, blurry and near-duplicate frames are
dropped with their reason. A run-level merge then drops frames that repeat another episode's
(openings, endings, recaps). Which files are episodes: tasks/sources/episodes.py.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import cv2
import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from models.weights import file_identity
from tasks.decode import at_width, decoded_frames, error_text, luma, main_stream, quarter_turns, thumbnail, turn_upright
from tasks.image_hash import hamming_to_all, perceptual_hash
from tasks.run.progress import StageProgress
from tasks.run.spec import SOURCES, Inputs, ShardedStage
from tasks.run.stage import Plan, Shard, StageResult, merge_shards, run_shard
from tasks.run.store import QUARANTINE, RunStore, fingerprint, storable_text, write_error, write_table
from tasks.sources.episodes import changed_since, discover_videos, episode_ids, file_stamp, unreadable

STAGE = "frames"
VERSION = 3

SCHEMA = pa.schema([
    ("item_id", pa.string()),
    ("source_id", pa.string()),        # the episode
    ("episode", pa.string()),
    ("frame_index", pa.int64()),
    ("timestamp", pa.float64()),
    ("shot_id", pa.int32()),
    ("phash", pa.string()),
    ("sharpness", pa.float32()),
    ("brightness", pa.float32()),
    ("kept", pa.bool_()),
    ("drop_reason", pa.string()),
    ("duplicate_of", pa.string()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("path", pa.string()),
])

EPISODE_SCHEMA = pa.schema([
    ("episode", pa.string()),
    ("video", pa.string()),
    ("status", pa.string()),           # ok / damaged / quarantined
    ("reason", pa.string()),
    ("frames_decoded", pa.int64()),    # frames that were decoded (unsampled non-reference frames are skipped)
    ("decode_errors", pa.int64()),
    ("shots", pa.int64()),
    ("shot_starts", pa.list_(pa.int64())),   # frame index where each shot begins
    ("sampled", pa.int64()),
    ("kept", pa.int64()),
    ("bytes_written", pa.int64()),
])


class FramesParams(BaseModel):
    """How frames are sampled and filtered."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["interval", "keyframes", "scene"] = Field("scene", description="every N seconds, key frames only, or per shot")
    interval_s: float = Field(1.0, gt=0, description="seconds between samples (interval mode)")
    scene_sample_s: float = Field(0.5, gt=0, description="seconds between candidates inside a shot (scene mode)")
    max_per_shot: int = Field(3, ge=1, description="at most this many frames per shot (scene mode)")
    cut_threshold: float = Field(0.05, gt=0, lt=1, description="thumbnail change (0-1) that counts as a hard cut")
    black_level: float = Field(18.0, ge=0, le=255, description="mean luma below this is a black frame")
    uniform_std: float = Field(6.0, ge=0, description="luma std below this is a uniform frame")
    blur_threshold: float = Field(20.0, ge=0, description="Laplacian variance below this is a blurry frame")
    dedup_distance: int = Field(6, ge=0, le=64, description="perceptual-hash bits that may differ in a near-duplicate")
    dedup_across_run: bool = Field(True, description="also drop frames that repeat another episode's")
    image_format: Literal["png", "webp"] = Field("png", description="lossless format of kept frames")


def known_episodes(store: RunStore) -> dict[str, str]:
    """Video -> episode id of every episode shard the run has committed (any fingerprint)."""
    known: dict[str, str] = {}
    for _, report in sorted(store.shard_reports(STAGE).items(), reverse=True):  # the first folder by name wins
        if isinstance(report.get("video"), str) and isinstance(report.get("episode"), str):
            known[report["video"]] = report["episode"]
    return known


# ---- frame measures -------------------------------------------------------------------------

def sharpness(gray: np.ndarray) -> float:
    """Laplacian variance of a grey image measured at MEASURE_WIDTH (so the threshold does not
    depend on resolution); pass `at_width(gray)` to skip the resize."""
    return float(cv2.Laplacian(at_width(gray), cv2.CV_32F).var())


def drop_reason_for(brightness: float, contrast: float, sharp: float, params: FramesParams) -> str | None:
    if brightness < params.black_level and contrast < 2 * params.uniform_std:
        return "black"
    if contrast < params.uniform_std:
        return "uniform"
    if sharp < params.blur_threshold:
        return "blurry"
    return None


# ---- one episode ----------------------------------------------------------------------------

PNG_FLAGS = [cv2.IMWRITE_PNG_COMPRESSION, 1, cv2.IMWRITE_PNG_FILTER, cv2.IMWRITE_PNG_FILTER_SUB]
"""Fast lossless PNG: zlib level 1 and one row filter (SUB) instead of libpng trying all five per
row, which took half the encoding time (5.7 instead of 12 ms a 960x540 frame, files ~1.4x)."""


def _write_image(target: Path, bgr: np.ndarray, image_format: str) -> int:
    """Write one frame (BGR, as cv2 wants it) losslessly; returns its size in bytes."""
    flags = [cv2.IMWRITE_WEBP_QUALITY, 101] if image_format == "webp" else PNG_FLAGS  # 101 = lossless WebP
    if not cv2.imwrite(str(target), bgr, flags):
        raise write_error(target)
    return target.stat().st_size


WRITERS = max(1, min(4, os.cpu_count() or 1))
"""Threads encoding kept frames (cv2 releases the GIL while it encodes)."""
QUEUED = 64
"""At most this many sampled frames wait for the analysis thread (bounds memory on slow disks)."""


@dataclass
class _Candidate:
    frame_index: int
    timestamp: float
    shot_id: int
    frame: Any = None              # the decoded av.VideoFrame, until converted
    bgr: np.ndarray | None = None
    measured: _Measure | None = None
    width: int = 0
    height: int = 0

    turns: int = 0                 # quarter turns (counter-clockwise) its display matrix asks for

    def __post_init__(self) -> None:
        if self.frame is not None:
            self.turns = quarter_turns(self.frame)  # phone clips
            self.width, self.height = self.frame.width, self.frame.height
            if self.turns % 2:
                self.width, self.height = self.height, self.width

    def upright(self, image: np.ndarray) -> np.ndarray:
        """`image` (a decoded frame's pixels) as the frame is meant to be shown."""
        return turn_upright(image, self.turns)

    def image(self) -> np.ndarray:
        """The frame as BGR, the order cv2 encodes, upright (converted once, on the analysis thread)."""
        if self.bgr is None:
            self.bgr = self.upright(self.frame.to_ndarray(format="bgr24"))
            self.frame = None
        return self.bgr


@dataclass
class _Measure:
    brightness: float
    sharpness: float
    phash: int
    reason: str | None  # black / uniform / blurry, or None


@dataclass
class _Episode:
    """Mutable state of one episode's extraction.

    The decode thread only decodes, detects cuts and picks the sampled frames; it hands them in
    order to one analysis thread (measures from the luma plane, keep/drop decisions, BGR
    conversion of the kept frames only), which queues kept frames to the writer threads. One
    analysis thread in decode order keeps the result identical to doing everything inline.
    """

    episode: str
    out: Path
    prefix: str
    params: FramesParams
    rows: list[dict] = field(default_factory=list)
    kept_hashes: list[int] = field(default_factory=list)
    kept_ids: list[str] = field(default_factory=list)
    bytes_written: int = 0
    analysis: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="frame-analysis"))
    writer: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(WRITERS, thread_name_prefix="frame-writer"))
    jobs: list[Future] = field(default_factory=list)
    pending: list[Future] = field(default_factory=list)
    queued: threading.BoundedSemaphore = field(default_factory=lambda: threading.BoundedSemaphore(QUEUED))

    def submit(self, job: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        """Run `job` on the analysis thread after every job submitted before it."""
        if self.jobs and self.jobs[-1].done() and self.jobs[-1].exception() is not None:
            raise self.jobs[-1].exception()  # stop decoding once the analysis failed
        self.queued.acquire()

        def run() -> Any:
            try:
                return job(*args, **kwargs)
            finally:
                self.queued.release()

        self.jobs.append(self.analysis.submit(run))

    def measure(self, cand: _Candidate) -> _Measure:
        if cand.measured is None:
            small = cand.upright(luma(cand.frame))  # every measure at a fixed width: cheaper, alike at any resolution
            mean, std = cv2.meanStdDev(small)
            brightness, contrast = float(mean[0, 0]), float(std[0, 0])
            sharp = sharpness(small)
            cand.measured = _Measure(brightness, sharp, perceptual_hash(small),
                                     drop_reason_for(brightness, contrast, sharp, self.params))
        return cand.measured

    def record(self, cand: _Candidate, m: _Measure | None = None, *, forced_reason: str | None = None) -> bool:
        """Decide keep or drop for a sampled frame, save it when kept; returns whether it was kept."""
        m = m or self.measure(cand)
        item_id = f"{self.episode}:{cand.frame_index:07d}"
        reason, duplicate_of = forced_reason or m.reason, None
        if reason is None and self.kept_hashes:
            dist = hamming_to_all(m.phash, np.array(self.kept_hashes, dtype=np.uint64))
            nearest = int(dist.argmin())
            if dist[nearest] <= self.params.dedup_distance:
                reason, duplicate_of = "duplicate", self.kept_ids[nearest]
        path = None
        if reason is None:
            path = self._save(cand)
            self.kept_hashes.append(m.phash)
            self.kept_ids.append(item_id)
        h, w = cand.height, cand.width
        self.rows.append({
            "item_id": item_id, "source_id": self.episode, "episode": self.episode,
            "frame_index": cand.frame_index, "timestamp": round(cand.timestamp, 4), "shot_id": cand.shot_id,
            "phash": f"{m.phash:016x}", "sharpness": m.sharpness, "brightness": m.brightness,
            "kept": reason is None, "drop_reason": reason, "duplicate_of": duplicate_of,
            "width": w, "height": h, "path": path,
        })
        cand.bgr = cand.frame = None  # decided: only a queued write still holds the image
        return reason is None

    def _save(self, cand: _Candidate) -> str:
        """Queue the frame for writing on a writer thread (image encoding overlaps decoding)."""
        name = f"{cand.frame_index:07d}.{self.params.image_format}"
        while self.pending and (self.pending[0].done() or len(self.pending) >= 2 * WRITERS):
            self.bytes_written += self.pending.pop(0).result()  # when writes lag behind, wait for the oldest
        self.pending.append(self.writer.submit(_write_image, self.out / "images" / name, cand.image(), self.params.image_format))
        return f"{self.prefix}/images/{name}"

    def finish(self) -> None:
        """Wait for the analysis jobs and the queued images; raises the first error."""
        try:
            for job in self.jobs:
                job.result()
        finally:
            self.jobs.clear()
            self.bytes_written += sum(f.result() for f in self.pending)
            self.pending.clear()

    def shutdown(self) -> None:
        self.analysis.shutdown(cancel_futures=True)
        self.writer.shutdown()

    def close_shot(self, candidates: list[_Candidate]) -> None:
        """Scene mode: keep at most K good, distinct candidates of a finished shot, spread over it."""
        measures = [self.measure(c) for c in candidates]
        good = [i for i, m in enumerate(measures) if m.reason is None]
        k = self.params.max_per_shot
        spread = [good[round(j)] for j in np.linspace(0, len(good) - 1, min(k, len(good)))] if good else []
        kept = 0
        for i in dict.fromkeys(spread + good):  # spread picks first, the rest stand in for duplicates
            if kept < k:
                kept += self.record(candidates[i], measures[i])
            else:
                self.record(candidates[i], measures[i], forced_reason="shot_limit")
        for i, m in enumerate(measures):
            if m.reason is not None:
                self.record(candidates[i], m)




def extract_frames(video: Path, episode: str, params: FramesParams, out: Path, prefix: str,
                   stamp: tuple[int, int] | None = None) -> tuple[pa.Table, dict]:
    """Sample one episode's frames into `out/images/`.

    Args:
        video: the episode file.
        episode: its id (used in item ids).
        params: sampling and filtering parameters.
        out: folder to write images into (a shard's temporary folder).
        prefix: the run-relative path that `out` will have once committed.
        stamp: (size, mtime_ns) the file had when the run was planned (default: when opened).
    Returns:
        (manifest rows as a Table with SCHEMA, the episode report as a dict with EPISODE_SCHEMA fields).
    """
    import av  # heavy import kept inside the stage

    (out / "images").mkdir(parents=True, exist_ok=True)
    state = _Episode(episode=episode, out=out, prefix=prefix, params=params)
    report = _new_report(video, episode)
    problem = unreadable(video)
    if problem:
        return _quarantined(video, episode, report, problem)
    stamp = stamp or file_stamp(video)
    try:
        container = av.open(str(video))
    except Exception as exc:  # PyAV raises many kinds: all mean "cannot read this file"
        return _quarantined(video, episode, report, error_text(exc))
    with container:
        stream = main_stream(container)
        if stream is None:
            return _quarantined(video, episode, report, "no video stream")
        stream.thread_type = "AUTO"
        if params.mode == "keyframes":
            stream.codec_context.skip_frame = "NONKEY"
        rate = float(stream.average_rate or stream.guessed_rate or 25)
        expected = stream.frames or (int(float(stream.duration * stream.time_base) * rate) if stream.duration else None)
        with StageProgress(f"frames {episode}", expected) as bar:
            try:
                _decode(container, stream, rate, state, report, bar)
            finally:
                try:
                    state.finish()
                finally:
                    state.shutdown()
    state.rows.sort(key=lambda r: r["frame_index"])
    if report["frames_decoded"] == 0:
        return _quarantined(video, episode, report, report["reason"] or "no decodable frames")
    if report["decode_errors"]:
        report["status"] = "damaged"
    moved = changed_since(video, stamp)
    if moved:  # a file still being written (a download, a recording): what was read may be partial
        report.update(status="damaged", reason="; ".join(filter(None, [moved, report["reason"]])))
    report["sampled"] = len(state.rows)
    report["kept"] = sum(r["kept"] for r in state.rows)
    report["bytes_written"] = state.bytes_written
    return pa.Table.from_pylist(state.rows, schema=SCHEMA), report


def _maybe_sampled(packet, start: float, next_sample: float, last_t: float, params: FramesParams) -> bool:
    """Whether the frame in `packet` could still become a sample, judged from its time before decoding.

    Interval mode: the next sample is the first frame at or after `next_sample`, which only grows,
    so an earlier frame never is one. Scene mode: a cut can only come after the last decoded frame
    (`last_t`), and the next candidate is then at least `scene_sample_s` after it. Frames that cannot
    be samples are decoded only when other frames reference them (skip_frame NONREF); cuts are
    detected on the decoded ones (an encoder puts a reference frame at a scene cut).
    """
    if packet.pts is None:
        return True
    t = float(packet.pts * packet.time_base) - start
    horizon = next_sample if params.mode == "interval" else min(next_sample, last_t + params.scene_sample_s)
    return t + 1e-6 >= horizon


def _decode(container, stream, rate: float, state: _Episode, report: dict, bar: StageProgress) -> None:
    """Decode the frames that may be sampled and those they reference (or key frames only), detect
    cuts, sample. Frame indexes come from frame times, so they do not depend on what was skipped."""
    params = state.params
    index, shot, prev_thumb, last_t = -1, 0, None, float("-inf")
    next_sample = 0.0
    shot_candidates: list[_Candidate] = []
    cap = 4 * params.max_per_shot
    step = params.scene_sample_s
    start = float(stream.start_time * stream.time_base) if stream.start_time is not None else 0.0

    def wanted(packet) -> bool:  # reads the sampling state as it is when the packet comes up
        return _maybe_sampled(packet, start, next_sample, last_t, params)

    for frame in decoded_frames(container, stream, report, None if params.mode == "keyframes" else wanted):
        report["frames_decoded"] += 1
        t = float(frame.time) - start if frame.time is not None else (index + 1) / rate
        bar.advance(max(1, round(t * rate) - index))
        index, last_t = max(index + 1, round(t * rate)), t
        thumb = thumbnail(frame)
        is_cut = prev_thumb is not None and np.abs(thumb - prev_thumb).mean() / 255.0 > params.cut_threshold
        if is_cut or prev_thumb is None:
            report["shot_starts"].append(index)
        prev_thumb = thumb
        if is_cut:
            shot += 1
            if params.mode == "scene":
                state.submit(state.close_shot, shot_candidates)
                shot_candidates, step, next_sample = [], params.scene_sample_s, t
        if params.mode == "keyframes":
            state.submit(state.record, _Candidate(index, t, shot, frame))
        elif t + 1e-6 >= next_sample:
            cand = _Candidate(index, t, shot, frame)
            if params.mode == "interval":
                next_sample += params.interval_s
                state.submit(state.record, cand)
            else:
                next_sample = t + step
                shot_candidates.append(cand)
                state.submit(state.measure, cand)  # convert and measure now, decide at the cut
                if len(shot_candidates) > cap:  # long shot: thin evenly, sample half as often
                    for dropped in shot_candidates[1::2]:
                        state.submit(state.record, dropped, forced_reason="shot_limit")
                    shot_candidates = shot_candidates[0::2]
                    step *= 2
    if params.mode == "scene":
        state.submit(state.close_shot, shot_candidates)
    report["shots"] = shot + 1 if report["frames_decoded"] else 0


def _new_report(video: Path, episode: str) -> dict:
    """An episode's report (EPISODE_SCHEMA fields) before anything is read."""
    return {"episode": episode, "video": storable_text(video), "status": "ok", "reason": None, "frames_decoded": 0,
            "decode_errors": 0, "shots": 0, "shot_starts": [], "sampled": 0, "kept": 0, "bytes_written": 0}


def _quarantined(video: Path, episode: str, report: dict, reason: str) -> tuple[pa.Table, dict]:
    report.update(status="quarantined", reason=reason)
    row = {name: None for name in SCHEMA.names}
    row.update(item_id=f"{episode}:quarantine", source_id=episode, episode=episode, frame_index=-1,
               kept=False, drop_reason=f"{QUARANTINE}{storable_text(video.name)}: {reason}")
    return pa.Table.from_pylist([row], schema=SCHEMA), report


# ---- the run ---------------------------------------------------------------------------------

def merge_episodes(tables: list[pa.Table], params: FramesParams) -> pa.Table:
    """Concatenate episode manifests (sorted by item id) and drop frames repeated across episodes.

    The first episode (by id) keeps a repeated frame; later ones get
    `drop_reason = "duplicate_across_run"` and `duplicate_of` pointing at the kept frame.
    """
    table = pa.concat_tables(tables, promote_options="none") if tables else SCHEMA.empty_table()
    table = table.sort_by("item_id")
    if not params.dedup_across_run or table.num_rows == 0:
        return table
    rows = table.to_pylist()
    seen_hashes: list[np.ndarray] = []
    seen_ids: list[str] = []
    for episode in sorted({r["episode"] for r in rows}):
        mine = [r for r in rows if r["episode"] == episode and r["kept"]]
        earlier = np.concatenate(seen_hashes) if seen_hashes else np.empty(0, dtype=np.uint64)
        if earlier.size and mine:  # an episode that kept nothing adds no hashes to compare with
            for r in mine:
                dist = hamming_to_all(int(r["phash"], 16), earlier)
                nearest = int(dist.argmin())
                if dist[nearest] <= params.dedup_distance:
                    r.update(kept=False, drop_reason="duplicate_across_run", duplicate_of=seen_ids[nearest])
        survivors = [r for r in mine if r["kept"]]
        seen_hashes.append(np.array([int(r["phash"], 16) for r in survivors], dtype=np.uint64))
        seen_ids.extend(r["item_id"] for r in survivors)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def summarize(table: pa.Table, episodes: list[dict]) -> dict:
    """Counts for the status table and the UI."""
    kept = table.column("kept").to_pylist()
    reasons = [r for r in table.column("drop_reason").to_pylist() if r]
    by_reason: dict[str, int] = {}
    for r in reasons:
        key = "quarantine" if r.startswith(QUARANTINE) else r
        by_reason[key] = by_reason.get(key, 0) + 1
    return {
        "episodes": len(episodes),
        "sampled": sum(e["sampled"] for e in episodes),
        "kept": int(sum(kept)),
        "quarantined": sum(e["status"] == "quarantined" for e in episodes),
        "damaged": sum(e["status"] == "damaged" for e in episodes),
        "dropped": by_reason,
        "bytes_written": sum(e["bytes_written"] for e in episodes),
    }

# ---- plan, shard, merge ---------------------------------------------------------------------

NOT_UTF8 = "the file name is not valid UTF-8, so it cannot be stored: rename the file (e.g. with convmv) to read it"


def plan_frames(store: RunStore, params: Any, inputs: Inputs) -> Plan:
    """One shard per episode the sources name, fingerprinted by its file; the ids the run already has
    never change."""
    videos = discover_videos(inputs[SOURCES].summary["paths"])
    settings = params.frames.model_dump(mode="json")
    ids = episode_ids(videos, known_episodes(store))
    return Plan(shards=[_plan_episode(video, episode, settings) for video, episode in zip(videos, ids)])


def _plan_episode(video: Path, episode: str, settings: dict) -> Shard:
    """One episode's shard, fingerprinted from the file's identity (`file_identity` opens only a regular
    file: a FIFO would block). Its payload: the video as stored, the (size, mtime_ns) it has now, or why
    it cannot be read at all (a name that is not UTF-8)."""
    name = storable_text(video)
    if name != str(video):  # carried as its escaped name, quarantined
        return Shard(key=episode, payload={"video": name, "stamp": None, "problem": NOT_UTF8},
                     fingerprint=fingerprint(STAGE, VERSION, settings, {"video": f"not-utf8:{name}"}))
    identity = fingerprint(STAGE, VERSION, settings, {"video": file_identity(video)})
    stamp = None if unreadable(video) else file_stamp(video)
    return Shard(key=episode, fingerprint=identity, payload={"video": name, "stamp": stamp, "problem": None})


def frames_for_episode(store: RunStore, shard: Shard, params: Any, plan: Plan) -> StageResult:
    """Extract one episode into its shard, unless that shard is already committed."""
    video, problem = Path(shard.payload["video"]), shard.payload["problem"]

    def build(out: Path, prefix: str) -> tuple[pa.Table, dict]:
        if problem:
            return _quarantined(video, shard.key, _new_report(video, shard.key), problem)
        return extract_frames(video, shard.key, params.frames, out, prefix, stamp=shard.payload["stamp"])

    return run_shard(store, STAGE, shard.key, shard.fingerprint, build)


def merge_frames(store: RunStore, plan: Plan, params: Any) -> StageResult:
    """Merge committed episode shards into `frames/manifest.parquet` (cross-episode dedup)."""
    def merge(tables: list[pa.Table], reports: list[dict]) -> tuple[pa.Table, dict, list[str]]:
        table = merge_episodes(tables, params.frames)
        write_table(pa.Table.from_pylist(reports, schema=EPISODE_SCHEMA), store.stage_dir(STAGE) / "episodes.parquet")
        return table, summarize(table, reports), [f"{STAGE}/episodes.parquet"]

    return merge_shards(store, STAGE, plan.fingerprint, plan.shard_fingerprints(), merge)


FRAMES = ShardedStage(name=STAGE, version=VERSION, params=FramesParams, inputs=(SOURCES,), title="frames",
                      plan=plan_frames, shard=frames_for_episode, merge=merge_frames)
"""The frames stage: one shard per episode of the sources, merged with cross-episode dedup."""
