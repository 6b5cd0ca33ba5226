"""The cluster report: a self-contained HTML page and its JSON twin (the guide's cluster_analysis).

`write_report(store, stages)` reads the finished stages handed to it by role (`clusters`, `tiers`,
and `selection` when done: a run's cluster, tier and select stages, `RUN_STAGES`) and
writes `<run>/report/cluster_report.html` and `.json`: a tier table (clusters per tier and
kind), the 2-D map as a PNG scatter coloured by cluster, and per cluster a contact sheet of
sample layers with tier, kind, counts, quality measures and, once selected, its character
name and trigger. Each character or mixed cluster also shows its estimated purity and its
least typical layers first, each with a tick box that adds `exclude: true` for it to an
overrides snippet on the page (paste it into the select overrides file); scenery clusters are
listed apart, as background material. Images are embedded as data URIs, so the file can be
mailed or archived.

The markup is in Jinja2 templates (`tasks/templates/report.html.j2`, autoescaped); this module
prepares what they show. `render_review` makes the same page the review page of a paused run
(`review.html.j2`: name, trigger, train tick and layer exclusion per cluster; flows/review.py).
"""

from __future__ import annotations

import base64
import colorsys
import datetime as dt
import functools
import io
import json
from pathlib import Path
from typing import Any

import jinja2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tasks.run.stage import RunRef, StageResult
from tasks.run.store import RunStore, StageNotDoneError
from tasks.tier import KINDS, TIERS, UNKNOWN, TierParams, quality_issues, size_tier

FOLDER = "report"
HTML_NAME = "cluster_report.html"
JSON_NAME = "cluster_report.json"
NOISE_COLOUR = (190, 190, 190)


def cluster_colour(cluster_id: int) -> tuple[int, int, int]:
    """A distinct, stable colour per cluster id (golden-angle hues)."""
    if cluster_id < 0:
        return NOISE_COLOUR
    h = (cluster_id * 0.618033988749895) % 1.0
    s, v = (0.75, 0.85) if cluster_id % 2 == 0 else (0.55, 0.7)
    r, g, b = colorsys.hsv_to_rgb(h, s, v)
    return int(r * 255), int(g * 255), int(b * 255)


# ---- content ---------------------------------------------------------------------------------

RUN_STAGES: dict[str, str] = {"clusters": "cluster", "tiers": "tier", "selection": "select"}
"""The report's input roles -> an episode run's stages (what the pipeline table binds them to)."""


def build_report(store: RunStore, stages: dict[str, str] = RUN_STAGES) -> dict[str, Any]:
    """The report's data (what the JSON file holds), from the stages bound to its roles."""
    clusters = store.read_manifest(stages["clusters"])
    tiers = store.read_manifest(stages["tiers"])
    tier_params = TierParams.model_validate(_own_params(store, stages["tiers"]))
    selection = stages.get("selection")
    selected: dict[int, dict] = {}
    characters: list[dict] = []
    select_warnings: list[str] = []
    if selection and store.is_done(selection):
        characters = _read_characters(store, selection)
        for c in characters:
            for cid in c["cluster_ids"]:
                selected[cid] = c
        select_warnings = (store.marker(selection) or {}).get("summary", {}).get("warnings", [])
    labels = clusters.column("cluster_id").to_pylist()
    n_layers = len(labels)
    noise = sum(1 for v in labels if v == -1)
    rows = []
    for r in sorted(tiers.to_pylist(), key=lambda r: (TIERS.index(r["tier"]), -r["size"], r["cluster_id"])):
        stats = {k: r[k] for k in ("mean_sharpness", "mean_alpha_coverage", "duplicate_ratio")}
        character = selected.get(r["cluster_id"])
        rows.append({
            **{k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()},
            "size_tier": size_tier(r["size"], tier_params),
            "quality_issues": quality_issues(stats, tier_params),
            "selected": character is not None,
            "character": character["character"] if character else None,
            "trigger": character["trigger"] if character else None,
        })
    kinds = list(dict.fromkeys([*KINDS, *sorted({r["kind"] for r in rows})]))
    by_tier_kind = {t: {k: sum(1 for r in rows if r["tier"] == t and r["kind"] == k) for k in kinds} for t in TIERS}
    cluster_marker = (store.marker(stages["clusters"]) or {}).get("summary", {})
    return {
        "run": store.name,
        "generated_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "embedder": cluster_marker.get("embedder"),
        "summary": {
            "layers": n_layers, "clusters": len(rows), "noise_layers": noise,
            "noise_fraction": round(noise / n_layers, 4) if n_layers else 0.0,
            "by_tier": {t: sum(by_tier_kind[t].values()) for t in TIERS},
            "by_kind": {k: sum(1 for r in rows if r["kind"] == k) for k in kinds},
            "by_tier_kind": by_tier_kind,
            "layers_by_tier": {t: sum(r["size"] for r in rows if r["tier"] == t) for t in TIERS},
            "recommended": sum(1 for r in rows if r["recommended"]),
            "recommended_tiers": list(tier_params.recommended_tiers),
            "selected_characters": len(characters),
            "merged_clusters": cluster_marker.get("merged"), "matched_ids": cluster_marker.get("matched_ids"),
        },
        "clusters": rows,
        "characters": characters,
        "warnings": select_warnings,
        "params": {s: _stage_params(store, s) for s in stages.values() if _stage_params(store, s)},
    }


def _stage_params(store: RunStore, stage: str) -> dict[str, Any] | None:
    """The parameters a stage ran with (its params.json), or None."""
    try:
        return json.loads((store.stage_dir(stage) / "params.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _own_params(store: RunStore, stage: str) -> dict[str, Any]:
    """A stage's own section of its params.json: the whole file, or its `stage` entry where the file also
    holds other parameters the stage reads (`reads=`, by dotted path)."""
    params = _stage_params(store, stage) or {}
    return params[stage] if isinstance(params.get(stage), dict) else params


def _read_characters(store: RunStore, selection: str) -> list[dict]:
    import pyarrow.parquet as pq

    path = store.stage_dir(selection) / "characters.parquet"
    return pq.read_table(path).to_pylist() if path.is_file() else []


# ---- pictures ------------------------------------------------------------------------------------

def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def map_png(xy: np.ndarray, labels: np.ndarray, *, size: tuple[int, int] = (880, 600)) -> bytes:
    """Scatter of the 2-D map coloured by cluster (noise grey), cluster ids at their medians."""
    width, height = size
    image = Image.new("RGB", size, (255, 255, 255))
    draw = ImageDraw.Draw(image)
    margin = 24
    if len(xy):
        lo, hi = xy.min(0), xy.max(0)
        span = np.maximum(hi - lo, 1e-6)
        pts = margin + (xy - lo) / span * np.array([width - 2 * margin, height - 2 * margin])
        pts[:, 1] = height - pts[:, 1]
        order = np.argsort(labels >= 0, kind="stable")  # noise first, clusters on top
        for i in order:
            r = 2 if labels[i] < 0 else 3
            x, y = pts[i]
            draw.ellipse((x - r, y - r, x + r, y + r), fill=cluster_colour(int(labels[i])))
        font = ImageFont.load_default(size=15)
        for cid in sorted(set(labels.tolist()) - {-1}):
            members = pts[labels == cid]
            x, y = members[np.argmin(((members - np.median(members, axis=0)) ** 2).sum(1))]  # a member near the middle
            draw.text((x, y - 10), str(cid), fill=(0, 0, 0), font=font, anchor="mm", stroke_width=3,
                      stroke_fill=(255, 255, 255))
    draw.rectangle((0, 0, width - 1, height - 1), outline=(200, 200, 200))
    return _png(image)


def _checkerboard(side: int, cell: int = 8) -> Image.Image:
    yy, xx = np.mgrid[0:side, 0:side]
    board = np.where(((yy // cell) + (xx // cell)) % 2 == 0, 235, 205).astype(np.uint8)
    return Image.fromarray(np.dstack([board] * 3), "RGB")


def contact_sheet(root: Path, paths: list[str], *, thumb: int = 96, columns: int = 8) -> bytes:
    """Sample layers on a checkerboard, `columns` per row; unreadable files become a red cross."""
    paths = paths or []
    cols = max(1, min(columns, len(paths)))
    rows = max(1, -(-len(paths) // cols))
    sheet = Image.new("RGB", (cols * (thumb + 4) + 4, rows * (thumb + 4) + 4), (255, 255, 255))
    for i, rel in enumerate(paths):
        x, y = 4 + (i % cols) * (thumb + 4), 4 + (i // cols) * (thumb + 4)
        cell = _checkerboard(thumb)
        try:
            with Image.open(root / rel) as im:
                layer = im.convert("RGBA")
            layer.thumbnail((thumb, thumb), Image.Resampling.LANCZOS)
            cell.paste(layer, ((thumb - layer.width) // 2, (thumb - layer.height) // 2), layer)
        except (OSError, ValueError):
            draw = ImageDraw.Draw(cell)
            draw.line((0, 0, thumb, thumb), fill=(200, 0, 0), width=3)
            draw.line((0, thumb, thumb, 0), fill=(200, 0, 0), width=3)
        sheet.paste(cell, (x, y))
    return _png(sheet)


# ---- HTML ----------------------------------------------------------------------------------------

TEMPLATES = Path(__file__).parent / "templates"
"""The page's Jinja2 templates (report.html.j2; review.html.j2 extends it) with their CSS and script."""


@functools.cache
def templates() -> jinja2.Environment:
    """The template environment: autoescaped HTML (the CSS and script files are included as they are)."""
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
        autoescape=jinja2.select_autoescape(disabled_extensions=("css", "js"), default_for_string=True, default=True),
        finalize=lambda value: "" if value is None else value)


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _tier_rows(s: dict[str, Any], kinds: list[str]) -> list[dict[str, Any]]:
    """The tier table's rows: clusters and layers per tier, per kind, and the tier's status."""
    recommended = set(s["recommended_tiers"])
    return [{"tier": t, "clusters": s["by_tier"][t], "layers": s["layers_by_tier"][t],
             "by_kind": [s["by_tier_kind"][t][k] for k in kinds],
             "status": "recommended" if t in recommended else ("needs augmentation" if t == "C" else "not recommended")}
            for t in TIERS]


def _card_view(c: dict[str, Any], sheets: dict[int, bytes], atypical: dict[str, bytes],
               choice: dict[str, Any] | None, review: bool = False) -> dict[str, Any]:
    """One cluster's card: the row with defaults filled in, its pictures as data URIs, and (on the review
    page) the review choice; the least typical layers are shown for non-scenery clusters or to review."""
    view = {"purity": None, "trimmed": 0, "faces": None, "moving": 0, "cut_by_frame": 0, "glue_trimmed": 0, "recurring": 0, **c}
    view.update(used=c.get("used", c["size"]), colour="#%02x%02x%02x" % cluster_colour(c["cluster_id"]),
                sheet_uri=_data_uri(sheets[c["cluster_id"]]), choice=choice)
    shown = choice is not None if review else c["kind"] != "scenery"
    excluded = set(choice["exclude"]) if choice else set()
    view["layers"] = [{"item_id": item, "thumb_uri": _data_uri(atypical[item]) if item in atypical else None,
                       "excluded": item in excluded} for item in (c.get("atypical_ids") or [])] if shown else []
    return view


def render_html(report: dict[str, Any], map_image: bytes, sheets: dict[int, bytes],
                atypical: dict[str, bytes] | None = None, review: dict[str, Any] | None = None) -> str:
    """The report page, every picture inline; with `review` (flow_run_id, api, choices by cluster id)
    the review page that resumes that paused flow run."""
    s = report["summary"]
    kinds = list(next(iter(s["by_tier_kind"].values())).keys()) if s["by_tier_kind"] else [UNKNOWN]
    choices = {int(k): v for k, v in (review or {}).get("choices", {}).items()}
    cards = [_card_view(c, sheets, atypical or {}, choices.get(c["cluster_id"]), review is not None)
             for c in report["clusters"]]
    scenery = [c for c in cards if c["kind"] == "scenery"]
    sections = [{"title": "Clusters", "cards": [c for c in cards if c["kind"] != "scenery"]}]
    if scenery:
        sections.append({"title": "Scenery (background material, never trained as a character)", "cards": scenery})
    context = {"report": report, "kinds": kinds, "tier_rows": _tier_rows(s, kinds), "map_uri": _data_uri(map_image),
               "sections": sections}
    if review:
        context["review"] = {"flow_run_id": review["flow_run_id"], "api": review.get("api", "/api"),
                             "clusters": [c["cluster_id"] for c in cards if c["choice"] is not None]}
    return templates().get_template("review.html.j2" if review else "report.html.j2").render(context)


def pictures(store: RunStore, report: dict[str, Any], stages: dict[str, str], layers: dict[str, str]
             ) -> tuple[bytes, dict[int, bytes], dict[str, bytes]]:
    """The page's pictures: the 2-D map, each cluster's contact sheet, and a thumbnail of each of `layers`
    (item id -> path in the run folder)."""
    clusters = store.read_manifest(stages["clusters"], columns=["cluster_id", "umap_x", "umap_y"])
    xy = np.stack([clusters.column("umap_x").to_numpy(zero_copy_only=False),
                   clusters.column("umap_y").to_numpy(zero_copy_only=False)], axis=1) if clusters.num_rows else np.zeros((0, 2))
    labels = clusters.column("cluster_id").to_numpy(zero_copy_only=False) if clusters.num_rows else np.zeros(0, int)
    sheets = {c["cluster_id"]: contact_sheet(store.root, c["sample_paths"]) for c in report["clusters"]}
    thumbs = {item: contact_sheet(store.root, [path], thumb=72, columns=1) for item, path in layers.items()}
    return map_png(xy, labels), sheets, thumbs


def _check_done(store: RunStore, stages: dict[str, str]) -> None:
    if not (store.is_done(stages["clusters"]) and store.is_done(stages["tiers"])):
        raise StageNotDoneError(f"run '{store.name}' has no finished cluster and tier stages; run it with "
                                f"--until tier (or later) first")


def write_report(store: RunStore, out: Path | None = None, stages: dict[str, str] = RUN_STAGES
                 ) -> tuple[Path, Path, dict[str, Any]]:
    """Write `cluster_report.html` and `.json` (default folder `<run>/report/`) from the stages bound to
    the report's roles. Returns (html, json, data). Raises StageNotDoneError without clusters and tiers."""
    _check_done(store, stages)
    report = build_report(store, stages)
    atypical = {item: path for c in report["clusters"] if c["kind"] != "scenery"
                for item, path in zip(c.get("atypical_ids") or [], c.get("atypical_paths") or [])}
    map_image, sheets, thumbs = pictures(store, report, stages, atypical)
    folder = Path(out) if out else store.root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    html_path, json_path = folder / HTML_NAME, folder / JSON_NAME
    for path, text in ((html_path, render_html(report, map_image, sheets, thumbs)),
                       (json_path, json.dumps(report, indent=2, default=str))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return html_path, json_path, report


def render_review(store: RunStore, choices: dict[int, dict[str, Any]], flow_run_id: str, api: str = "/api",
                  stages: dict[str, str] = RUN_STAGES) -> str:
    """The review page of a paused flow run: the report with, per cluster of `choices` (cluster id ->
    selected, name, trigger, exclude: layer ids, layers: least typical layer id -> path), its controls.
    It resumes `flow_run_id` through the Prefect API at `api` (the page's own server by default)."""
    _check_done(store, stages)
    report = build_report(store, stages)
    layers = {item: path for choice in choices.values() for item, path in choice["layers"].items()}
    map_image, sheets, thumbs = pictures(store, report, stages, layers)
    review = {"flow_run_id": flow_run_id, "api": api,
              "choices": {cid: {k: v for k, v in c.items() if k != "layers"} for cid, c in choices.items()}}
    return render_html(report, map_image, sheets, thumbs, review)


def write_cluster_report(run: RunRef, inputs: dict[str, StageResult]) -> str:
    """Write the cluster report from the stages the runner hands it (a pipeline hook after tier/select)."""
    html_path, _, report = write_report(run.store(), stages={role: result.stage for role, result in inputs.items()})
    print(f"cluster report: {html_path} ({report['summary']['clusters']} clusters)")
    return str(html_path)


def summary_table(report: dict[str, Any]) -> Any:
    """The terminal summary (a rich Table): clusters per tier and kind, like the guide's analysis summary."""
    from rich.table import Table

    s = report["summary"]
    kinds = list(next(iter(s["by_tier_kind"].values())).keys())
    table = Table(title=f"run {report['run']}: {s['clusters']} clusters of {s['layers']} layers, "
                        f"noise {s['noise_layers']} ({100 * s['noise_fraction']:.1f} %)")
    for column in ("tier", "clusters", "layers", *kinds, "status"):
        table.add_column(column, justify="left" if column in ("tier", "status") else "right")
    for row in _tier_rows(s, kinds):
        table.add_row(row["tier"], str(row["clusters"]), str(row["layers"]), *map(str, row["by_kind"]), row["status"])
    table.add_row("all", str(s["clusters"]), str(s["layers"] - s["noise_layers"]),
                  *(str(s["by_kind"].get(k, 0)) for k in kinds), f"{s['selected_characters']} characters selected")
    return table
