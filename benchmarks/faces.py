"""Face-detector benchmark: libnvxs time per 960x540 frame and per character layer, against u2netp.

    .venv/bin/python -m benchmarks.faces [--repeats 2] [--threads 2] [--seed 0]

Frames are the anime test art of tests/anime_art.py (Ren'Py example-game sprites over their
backgrounds, fetched from Debian packages on first use): every background at 960x540 once bare
and once with one or two sprites composited at 0.45-0.75 of their size. Layers are those sprites
as the segment stage would cut them (RGBA, cropped to the sprite's box). The baseline is the
offline segmenter, u2netp, run bare in onnxruntime on the same frames (what the segment stage
pays per frame anyway), so the ratios say what faces add to the segment stage. Timings are the
best of `--repeats`, alternated with the baseline so drifting load hits both; CPU time is the
process's, all threads.
"""

from __future__ import annotations

import argparse
import threading
import time

import cv2
import numpy as np

from models.faces import face_detector
from models.segmenters import segmenter
from models.weights import ensure_u2netp
from tests import anime_art

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
SIZE = (960, 540)


def compose(rng: np.random.Generator, background: str, sprites: list[str]) -> tuple[np.ndarray, list[dict]]:
    """A 960x540 frame of `background` with `sprites` standing in it; per sprite its layer and place."""
    frame = cv2.resize(anime_art.load(background), SIZE, interpolation=cv2.INTER_AREA)
    placed = []
    slots = np.linspace(0, SIZE[0], len(sprites) + 1)
    for i, name in enumerate(sprites):
        scale = rng.uniform(0.45, 0.75)
        rgb = cv2.resize(anime_art.load(name), None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        alpha = cv2.resize(anime_art.alpha(name), None, fx=scale, fy=scale, interpolation=cv2.INTER_AREA)
        h, w = alpha.shape
        x = int(rng.uniform(slots[i], max(slots[i], slots[i + 1] - w)))
        x = min(max(x, 0), SIZE[0] - w)
        y = SIZE[1] - h
        a = alpha[:, :, None] / 255.0
        region = frame[y:y + h, x:x + w]
        frame[y:y + h, x:x + w] = (rgb * a + region * (1 - a) + 0.5).astype(np.uint8)
        ys, xs = np.nonzero(alpha > 8)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        layer = np.dstack([frame[y:y + h, x:x + w], alpha])[box[1]:box[3], box[0]:box[2]]
        placed.append({"name": name, "x": x + box[0], "y": y + box[1], "layer": np.ascontiguousarray(layer)})
    return frame, placed


def bare_u2netp(session, frames: list[np.ndarray]) -> None:
    """The baseline: u2netp on each frame, mask scaled back (as benchmarks/segment.py's bare loop)."""
    name = session.get_inputs()[0].name
    for image in frames:
        x = cv2.resize(image, (320, 320), interpolation=cv2.INTER_LINEAR).astype(np.float32) / 255.0
        x = np.ascontiguousarray(((x - MEAN) / STD).transpose(2, 0, 1)[None])
        pred = session.run(None, {name: x})[0][0, 0]
        cv2.resize(pred, (image.shape[1], image.shape[0]), interpolation=cv2.INTER_LINEAR)


def timed(fn, *args) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    fn(*args)
    return time.perf_counter() - start, time.process_time() - cpu


def in_threads(detector, images: list[np.ndarray], threads: int) -> None:
    chunks = [images[i::threads] for i in range(threads)]
    workers = [threading.Thread(target=detector.detect, args=(chunk,)) for chunk in chunks]
    for w in workers:
        w.start()
    for w in workers:
        w.join()


def score(found_frames: list[list], placed_per_frame: list[list[dict]]) -> tuple[int, int, list[float]]:
    """(sprites whose face was found, false detections, likelihoods of the hits) over the frames.

    A hit is a face centred in the placed sprite's upper 45 %; every other detection is false.
    """
    hits = false = 0
    likelihoods = []
    for found, placed in zip(found_frames, placed_per_frame):
        matched = set()
        for p in placed:
            x0, y0 = p["x"], p["y"]
            x1, y1 = x0 + p["layer"].shape[1], y0 + 0.45 * p["layer"].shape[0]
            hit = [i for i, f in enumerate(found)
                   if x0 <= (f.box[0] + f.box[2]) / 2 <= x1 and y0 <= (f.box[1] + f.box[3]) / 2 <= y1]
            hits += bool(hit)
            matched.update(hit)
            likelihoods += [found[i].likelihood for i in hit]
        false += len(found) - len(matched)
    return hits, false, likelihoods


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    anime_art.ensure_art()
    ensure_u2netp()
    rng = np.random.default_rng(args.seed)
    sprites = list(anime_art.SPRITES)
    frames, scenery, placed_per_frame = [], [], []
    for background in anime_art.SCENERY:
        scenery.append(cv2.resize(anime_art.load(background), SIZE, interpolation=cv2.INTER_AREA))
        chosen = [sprites[i] for i in rng.choice(len(sprites), size=int(rng.integers(1, 3)), replace=False)]
        frame, placed = compose(rng, background, chosen)
        frames.append(frame)
        placed_per_frame.append(placed)
    layers = [p["layer"] for placed in placed_per_frame for p in placed]
    every_frame = frames + scenery
    print(f"frames: {len(every_frame)} at {SIZE[0]}x{SIZE[1]} ({len(frames)} with {len(layers)} sprites, "
          f"{len(scenery)} bare scenery); layers: {len(layers)}, median "
          f"{int(np.median([l.shape[1] for l in layers]))}x{int(np.median([l.shape[0] for l in layers]))}")

    detector, plain = face_detector("animeface"), face_detector("animeface", colours=False)
    padded = face_detector("animeface", pad=0.25)
    coarse = face_detector("animeface", min_face=64)
    session = segmenter("u2netp").session.inner_session
    bare_u2netp(session, every_frame[:2])  # warm up
    runs = {"u2netp": [], "frames": [], "frames_nocolour": [], "frames_min64": [], "layers": [], "layers_pad": [], "threads": []}
    for _ in range(args.repeats):
        runs["u2netp"].append(timed(bare_u2netp, session, every_frame))
        runs["frames"].append(timed(detector.detect, every_frame))
        runs["frames_nocolour"].append(timed(plain.detect, every_frame))
        runs["frames_min64"].append(timed(coarse.detect, every_frame))
        runs["layers"].append(timed(detector.detect, layers))
        runs["layers_pad"].append(timed(padded.detect, layers))
        runs["threads"].append(timed(in_threads, detector, every_frame, args.threads))
    best = {k: tuple(min(t) for t in zip(*v)) for k, v in runs.items()}
    n_frames, n_layers = len(every_frame), len(layers)
    per = {k: (w / (n_layers if k.startswith("layers") else n_frames), c / (n_layers if k.startswith("layers") else n_frames))
           for k, (w, c) in best.items()}

    def line(label: str, key: str) -> None:
        wall, cpu = per[key]
        print(f"{label:34s}: {wall * 1000:7.1f} ms wall, {cpu * 1000:7.1f} ms CPU"
              f"   ratio to u2netp/frame {wall / per['u2netp'][0]:5.2f} (CPU {cpu / per['u2netp'][1]:5.2f})")

    print(f"best of {args.repeats}; ratios are this time over bare u2netp's time per 960x540 frame")
    line("u2netp bare, per frame", "u2netp")
    line("animeface, per frame", "frames")
    line("animeface no colours, per frame", "frames_nocolour")
    line("animeface min_face=64, per frame", "frames_min64")
    line("animeface, per layer", "layers")
    line("animeface pad=0.25, per layer", "layers_pad")
    print(f"{'per layer / per frame':34s}: {per['layers'][0] / per['frames'][0]:7.3f} wall "
          f"({per['layers_pad'][0] / per['frames'][0]:.3f} with pad=0.25)")
    print(f"{f'{args.threads} threads / 1 thread throughput':34s}: {best['frames'][0] / best['threads'][0]:7.2f} "
          f"(libnvxs runs without the GIL; the colour analysis is serialised)")

    hits, false, likelihoods = score(detector.detect(frames), placed_per_frame)
    false_scenery = sum(len(f) for f in detector.detect(scenery))
    found_layers = detector.detect(layers)
    found_layers_pad = padded.detect(layers)
    coarse_hits, coarse_false, _ = score(coarse.detect(frames), placed_per_frame)
    print(f"frames: sprites' faces found {hits}/{n_layers}, false detections {false}, "
          f"likelihood {min(likelihoods, default=0):.2f}-{max(likelihoods, default=0):.2f}; "
          f"bare scenery frames: {false_scenery} detections")
    print(f"layers: with a face {sum(1 for f in found_layers if f)}/{n_layers} "
          f"({sum(1 for f in found_layers_pad if f)}/{n_layers} with pad=0.25), "
          f"more than one face {sum(1 for f in found_layers if len(f) > 1)}")
    print(f"frames with min_face=64: sprites' faces found {coarse_hits}/{n_layers}, false detections {coarse_false}")


if __name__ == "__main__":
    main()
