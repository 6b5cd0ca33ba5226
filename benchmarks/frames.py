"""Frames-stage benchmark: throughput against a bare PyAV decode loop, cut detection, no-op rerun.

    .venv/bin/python -m benchmarks.frames [--seconds 60] [--width 640 --height 360]

Everything is measured in this one process, so the ratios hold on a noisy machine; beside the
wall-time ratio, the ratio of CPU time (all threads of the process) and the load average are
printed: on a machine whose cores are all busy the stage's threads cannot overlap, and the CPU
ratio is what the wall-time ratio tends to.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("EPISODE2LORA_NO_PROGRESS", "1")  # progress lines would be part of what is timed

import av  # noqa: E402

from flows.params import RunParams  # noqa: E402
from tasks.frames import FramesParams, extract_frames  # noqa: E402
from tasks.pipelines import PIPELINES  # noqa: E402
from tasks.run.runner import run_steps  # noqa: E402
from tasks.run.store import RunStore  # noqa: E402
from tests.footage import ShotSpec, default_shots, render_episode  # noqa: E402


def bare_decode(video: Path) -> int:
    """The baseline: decode every frame with PyAV, do nothing with it."""
    with av.open(str(video)) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        return sum(1 for _ in container.decode(stream))


def best_of(n: int, fn) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def interleaved(repeats: int, baseline, candidate) -> tuple[float, float, float, float]:
    """Best wall and CPU time of each, measured alternately so machine noise hits both alike."""
    times: dict[str, list[tuple[float, float]]] = {"base": [], "cand": []}
    for _ in range(repeats):
        for key, fn in (("base", baseline), ("cand", candidate)):
            wall, cpu = time.perf_counter(), time.process_time()
            fn()
            times[key].append((time.perf_counter() - wall, time.process_time() - cpu))
    best = {k: (min(w for w, _ in v), min(c for _, c in v)) for k, v in times.items()}
    return best["base"][0], best["cand"][0], best["base"][1], best["cand"][1]


def cut_scores(report: dict, truth: dict) -> tuple[int, int, int]:
    true_cuts, found = set(truth["shot_starts"]) - {0}, set(report["shot_starts"]) - {0}
    return len(true_cuts & found), len(found), len(true_cuts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--width", type=int, default=640)
    ap.add_argument("--height", type=int, default=360)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ratios-only", action="store_true", help="skip cut detection and the no-op rerun")
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shots = default_shots(7, n_shots=max(2, int(args.seconds / 2.5)))
        shots = [ShotSpec(s.background_seed, s.characters, args.seconds / len(shots), s.camera) for s in shots]
        video = tmp / "bench.mp4"
        truth = render_episode(video, shots=shots, seed=7, size=(args.width, args.height), fps=24)
        n = bare_decode(video)
        print(f"video: {n} frames, {args.width}x{args.height}, {args.seconds:.0f} s at 24 fps")

        for mode, params in (("interval 1 s", FramesParams(mode="interval", interval_s=1.0)),
                             ("scene", FramesParams(mode="scene")),
                             ("keyframes", FramesParams(mode="keyframes"))):
            counter = iter(range(1000))
            bare, stage, bare_cpu, stage_cpu = interleaved(
                args.repeats, lambda: bare_decode(video),
                lambda: extract_frames(video, "e", params, tmp / f"o{next(counter)}", "x"))
            print(f"frames stage, {mode:<12} {n / stage:7.1f} frames/s, bare decode {n / bare:7.1f} frames/s, "
                  f"ratio {bare / stage:.2f} (CPU {bare_cpu / stage_cpu:.2f}), load {os.getloadavg()[0]:.1f}", flush=True)

        if args.ratios_only:
            return
        hits = found = true = 0
        for seed in range(10, 16):
            ep = tmp / f"cuts{seed}.mp4"
            t = render_episode(ep, seed=seed)
            _, report = extract_frames(ep, "e", FramesParams(), tmp / f"c{seed}", "x")
            h, f, tr = cut_scores(report, t)
            hits, found, true = hits + h, found + f, true + tr
        print(f"cut detection on 6 generated episodes: precision {hits / found:.3f}, recall {hits / true:.3f} "
              f"({true} true cuts)")

        store = RunStore(tmp / "runs", "bench")
        def run() -> None:
            run_steps(store, RunParams(), PIPELINES["episode"], "frames", sources=[str(video)])

        first = best_of(1, run)
        noop = best_of(args.repeats, run)
        print(f"no-op rerun of a finished run: {noop * 1000:.0f} ms ({first / noop:.0f}x faster than the first run, "
              f"{first:.2f} s)")


if __name__ == "__main__":
    main()
