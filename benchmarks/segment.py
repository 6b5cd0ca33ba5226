"""Segment-stage benchmark: throughput against a bare onnxruntime loop, peak RSS, IoU / recall.

    .venv/bin/python -m benchmarks.segment [--seconds 20] [--width 320 --height 180] [--repeats 2]

The baseline reads the same frame files and runs the stage's own onnxruntime session over them
with nothing else (resize, normalise, run, resize the mask back). The stage adds rembg's pre- and
post-processing, instance splitting, layer / mask / background PNGs, inpainting and the run
store. Both are measured in this one process, alternately, best of `--repeats`, so the ratio
holds on a noisy machine.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import yaml
import numpy as np

from flows.params import RunParams
from models.segmenters import providers, segmenter
from models.weights import ensure_u2netp
from tasks.frames import FramesParams
from tasks.pipelines import PIPELINES
from tasks.run.runner import run_steps
from tasks.run.stage import StageResult
from tasks.segment import SegmentParams
from tasks.run.store import RunStore
from tests.footage import ShotSpec, default_shots, render_episode
from tests.segment_scores import score

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def bare_loop(session, paths: list[Path]) -> int:
    """The baseline: read each frame, run u2netp on it, scale the mask back to the frame."""
    name = session.get_inputs()[0].name
    for path in paths:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        x = cv2.resize(image, (320, 320), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        x = np.ascontiguousarray(((x - MEAN) / STD).transpose(2, 0, 1)[None])
        pred = session.run(None, {name: x})[0][0, 0]
        pred = (pred - pred.min()) / max(float(pred.max() - pred.min()), 1e-6)
        cv2.resize(pred, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)
    return len(paths)


def _timed(fn, *args) -> tuple[float, float]:
    """(wall seconds, process CPU seconds, all threads) of one call."""
    start, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - start, time.process_time() - cpu


def segment_run(store: RunStore, run: RunParams) -> StageResult:
    """The segment stage on a run whose frames are done (as the pipeline runs it, no Prefect)."""
    return run_steps(store, run, PIPELINES["episode"], "segment", after="frames")["segment"]


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--width", type=int, default=320)
    ap.add_argument("--height", type=int, default=180)
    ap.add_argument("--interval", type=float, default=0.5, help="seconds between sampled frames")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="segment parameter of the stage runs, e.g. faces=none, plate_check=false")
    args = ap.parse_args()

    ensure_u2netp()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shots = default_shots(11, n_shots=max(2, int(args.seconds / 2.5)))
        shots = [ShotSpec(s.background_seed, s.characters, args.seconds / len(shots), s.camera) for s in shots]
        video = tmp / "bench.mp4"
        render_episode(video, shots=shots, seed=11, size=(args.width, args.height), fps=12, repeat_shot=None)
        framed = RunStore(tmp / "framed", "b")
        with framed.lock():
            sampling = FramesParams(mode="interval", interval_s=args.interval, dedup_distance=0)
            run_steps(framed, RunParams(frames=sampling), PIPELINES["episode"], "frames", sources=[str(video)])
        frames = [r for r in framed.read_manifest("frames").to_pylist() if r["kept"]]
        paths = [framed.root / r["path"] for r in frames]
        print(f"frames: {len(paths)} at {args.width}x{args.height} (model u2netp, providers {providers()})")

        params = SegmentParams.model_validate({k: yaml.safe_load(v) for k, v in (a.split("=", 1) for a in args.set)})
        run = RunParams(segment=params)
        print(f"stage parameters: {', '.join(args.set) or 'defaults'}")
        rss_before = peak_rss_mib()
        stage_model = segmenter("u2netp")
        stage_model.segment([cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths[:2]])  # warm up

        def stage_once(i: int) -> tuple[float, float]:
            runs = tmp / f"stage{i}"
            shutil.copytree(framed.root, runs / "b", ignore=shutil.ignore_patterns(".lock"))
            with RunStore(runs, "b").lock() as store:
                return _timed(segment_run, store, run)

        stage_times = [stage_once(0)]
        bare = stage_model.session.inner_session  # the very same onnxruntime session, used bare
        bare_times = []
        for i in range(args.repeats):  # stage, bare, stage, bare ...: drifting load hits both
            bare_times.append(_timed(bare_loop, bare, paths))
            if i + 1 < args.repeats:
                stage_times.append(stage_once(i + 1))
        with RunStore(tmp / "stage0", "b").lock() as store:
            start = time.perf_counter()
            result = segment_run(store, run)  # a no-op rerun: every shard and the merge are done
            rerun_s = time.perf_counter() - start

        bare_wall, bare_cpu = (min(t) for t in zip(*bare_times))
        stage_wall, stage_cpu = (min(t) for t in zip(*stage_times))
        bare_fps, stage_fps = len(paths) / bare_wall, len(paths) / stage_wall
        figures = score(store.read_manifest("segment"), store.root, {"bench": video})
        print(f"bare onnxruntime loop : {bare_fps:6.2f} frames/s  (best of {args.repeats}: {bare_wall:.2f} s, CPU {bare_cpu:.2f} s)")
        print(f"segment stage         : {stage_fps:6.2f} frames/s  (best of {args.repeats}: {stage_wall:.2f} s, CPU {stage_cpu:.2f} s)")
        print(f"ratio stage / bare    : {stage_fps / bare_fps:6.3f}   (goal >= 0.85; by CPU time {bare_cpu / stage_cpu:.3f})")
        print(f"no-op rerun           : {rerun_s:.3f} s (recomputed: {result.recomputed})")
        print(f"peak RSS              : {peak_rss_mib():.0f} MiB ({rss_before:.0f} MiB before the model was loaded)")
        print(f"layers                : {result.summary['kept']} from {result.summary['frames']} frames, "
              f"{result.summary['frames_with_2plus']} frames with 2+, flags empty/full "
              f"{result.summary['mask_empty']}/{result.summary['mask_full']}, clean plates {result.summary['clean_plates']}")
        print(f"mean mask IoU         : {figures['mean_iou']:.3f} over {figures['frames']} frames with characters")
        print(f"instance recall       : {figures['recall']:.3f} ({figures['instances']} instances), "
              f"layer precision {figures['precision']:.3f}, two-character frames split "
              f"{figures['two_char_split']}/{figures['two_char_frames']}")


if __name__ == "__main__":
    main()
