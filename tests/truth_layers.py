"""Character layers cut from generated footage with its ground-truth masks.

Stands in for the segment stage where a test must not depend on segmentation quality: every
instance of every sampled frame is cropped with its true mask into an RGBA layer, and a
`segment` stage is committed in the run store with the segment manifest contract. The true
identity of each layer is returned, so clustering can be scored (ARI, purity, noise).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.segment import SCHEMA as SEGMENT_SCHEMA
from tasks.run.store import RunStore, fingerprint, safe_name


def _decoded_frames(video: Path) -> list[np.ndarray]:
    import av

    with av.open(str(video)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def cut_episode_layers(video: Path, store: RunStore, *, stride: int = 1) -> tuple[list[dict], dict[str, str]]:
    """Write one episode's true layers into `segment/shards/<episode>/`; return (rows, identities)."""
    from PIL import Image

    episode = safe_name(video.stem)
    stem = video.with_suffix("")
    truth = json.loads(Path(f"{stem}.truth.json").read_text())
    labels = np.load(f"{stem}.masks.npz")["labels"]
    frames = _decoded_frames(video)
    folder = store.root / "segment" / "shards" / episode / "character"
    folder.mkdir(parents=True, exist_ok=True)
    rows, identities = [], {}
    for record in truth["frames"][::stride]:
        index = record["frame_index"]
        rgb, lab = frames[index], labels[index]
        for inst in record["instances"]:
            x0, y0, x1, y1 = inst["bbox"]
            alpha = np.where(lab[y0:y1, x0:x1] == inst["label"], 255, 0).astype(np.uint8)
            rgba = np.dstack([rgb[y0:y1, x0:x1], alpha])
            item_id = f"{episode}:{index:07d}:{inst['label']:02d}"
            name = f"{index:07d}_{inst['label']}.png"
            if not (folder / name).is_file():  # re-committing keeps earlier files (and their mtimes)
                Image.fromarray(rgba, "RGBA").save(folder / name)
            coverage = float((alpha > 0).mean())
            rows.append({
                **dict.fromkeys(SEGMENT_SCHEMA.names),
                "item_id": item_id, "source_id": f"{episode}:{index:07d}", "episode": episode,
                "frame_index": index, "instance": inst["label"], "bbox": [x0, y0, x1, y1],
                "area_frac": float((alpha > 0).sum() / lab.size), "alpha_coverage": coverage, "model": "truth",
                "width": lab.shape[1], "height": lab.shape[0], "path": f"segment/shards/{episode}/character/{name}",
                "kept": True, "drop_reason": None,
            })
            identities[item_id] = inst["identity"]
    return rows, identities


def commit_truth_segment(store: RunStore, videos: list[Path], *, stride: int = 1) -> tuple[pa.Table, dict[str, str]]:
    """Commit a `segment` stage holding the true layers of `videos`; return (manifest, identities)."""
    rows, identities = [], {}
    store.begin_stage("segment", {"truth": True, "stride": stride})
    for video in videos:
        r, ids = cut_episode_layers(Path(video), store, stride=stride)
        rows += r
        identities.update(ids)
    table = pa.Table.from_pylist(rows, schema=SEGMENT_SCHEMA).sort_by("item_id")
    fp = fingerprint("segment", 0, {"truth": True, "stride": stride}, {v.name: str(v) for v in map(Path, videos)})
    store.commit_stage("segment", table, fp, summary={"kept": table.num_rows})
    return table, identities


def scores(identities: list[str], labels: list[int]) -> dict[str, float]:
    """Adjusted Rand index (noise as its own label), purity of the clustered layers, noise fraction."""
    from sklearn.metrics import adjusted_rand_score

    y, c = np.asarray(identities), np.asarray(labels)
    clustered = c >= 0
    majority = 0
    for k in set(c[clustered].tolist()):
        _, counts = np.unique(y[c == k], return_counts=True)
        majority += int(counts.max())
    return {"ari": float(adjusted_rand_score(y, c)), "purity": majority / max(int(clustered.sum()), 1),
            "noise": float((~clustered).mean()) if len(c) else 0.0, "clusters": len(set(c[clustered].tolist()))}


def identities_of_layers(segment: pa.Table, videos: list[Path], *, match_iou: float = 0.5) -> dict[str, str | None]:
    """For layers of the real segment stage: the true identity whose box overlaps the layer's best.

    A layer whose box meets no true instance with IoU >= `match_iou` (a background object, a
    fragment, two characters in one layer) gets None.
    """
    from tests.segment_scores import box_iou

    truth = {}
    for video in videos:
        stem = Path(video).with_suffix("")
        truth[safe_name(Path(video).stem)] = json.loads(Path(f"{stem}.truth.json").read_text())["frames"]
    out: dict[str, str | None] = {}
    for row in segment.to_pylist():
        if not row["kept"] or row["path"] is None:
            continue
        instances = truth[row["episode"]][row["frame_index"]]["instances"]
        best = max(instances, key=lambda t: box_iou(row["bbox"], t["bbox"]), default=None)
        out[row["item_id"]] = best["identity"] if best and box_iou(row["bbox"], best["bbox"]) >= match_iou else None
    return out


def layer_cleanliness(rows: list[dict], run_root: Path, videos: list[Path], margin: int) -> dict[str, tuple[float, float]]:
    """For segment layers: (pixel precision, pixel recall) against the true instance they overlap most.

    Precision: the layer's opaque pixels (alpha > 127) that lie on that instance / its opaque pixels
    (scenery glued on lowers it); recall: the instance's pixels the layer holds / the instance's pixels
    (a layer cut in half lowers it). `margin`: segment.margin, where the layer image sits in its frame.
    Layers that overlap no true instance get (0, 0).
    """
    from PIL import Image

    labels = {safe_name(Path(v).stem): np.load(Path(v).with_suffix(".masks.npz"))["labels"] for v in videos}
    out: dict[str, tuple[float, float]] = {}
    for row in rows:
        frame = labels[row["episode"]][row["frame_index"]]
        x0, y0 = max(row["bbox"][0] - margin, 0), max(row["bbox"][1] - margin, 0)
        with Image.open(run_root / row["path"]) as im:
            opaque = np.asarray(im.convert("RGBA"))[..., 3] > 127
        under = frame[y0:y0 + opaque.shape[0], x0:x0 + opaque.shape[1]]
        ids, counts = np.unique(under[opaque & (under > 0)], return_counts=True)
        if not len(ids):
            out[row["item_id"]] = (0.0, 0.0)
            continue
        best = ids[np.argmax(counts)]
        on = int(counts.max())
        out[row["item_id"]] = (on / max(int(opaque.sum()), 1), on / max(int((frame == best).sum()), 1))
    return out


def commit_in_parts(store: RunStore, stages: dict[str, dict[str, "pa.Table | None"]]) -> dict:
    """Commit each stage's manifest in parts (key -> rows, or None to keep a part committed before), as the
    per-episode merges store them; returns the StageResults a run hands to the next stage."""
    from tasks.run.stage import StageResult

    results = {}
    for stage, parts in stages.items():
        fp = f"{stage}-{len(parts)}"
        store.begin_stage(stage, {})
        digest, _ = store.commit_parts(stage, parts, fp)
        results[stage] = StageResult(stage=stage, fingerprint=fp, manifest_digest=digest)
    return results
