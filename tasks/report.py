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
"""

from __future__ import annotations

import base64
import colorsys
import datetime as dt
import html
import io
import json
from pathlib import Path
from typing import Any

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
    tier_params = TierParams.model_validate(_stage_params(store, stages["tiers"]) or {})
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


# ---- HTML ---------------------------------------------------------------------------------------

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:1.5em;margin-bottom:4px} h2{margin-top:32px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#666;font-size:.9em} table{border-collapse:collapse;margin:8px 0;background:#fff}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:right} th{background:#f0f0f0}
td.l,th.l{text-align:left} .cards{display:flex;flex-wrap:wrap;gap:16px}
.card{background:#fff;border:1px solid #ddd;border-radius:6px;padding:10px;max-width:820px}
.card h3{margin:0 0 6px 0;font-size:1.05em} .tier{display:inline-block;min-width:1.6em;text-align:center;
border-radius:4px;color:#fff;font-weight:bold;margin-right:6px}
.tS{background:#b8860b}.tA{background:#2e7d32}.tB{background:#1565c0}.tC{background:#6a1b9a}.tD{background:#757575}
.issues{color:#b71c1c;font-size:.9em} .rec{color:#2e7d32;font-weight:bold} .swatch{display:inline-block;width:10px;
height:10px;border-radius:5px;margin-right:6px} img{image-rendering:auto}
.atypical{display:flex;flex-wrap:wrap;gap:6px} .layer{font-size:.75em;color:#555;text-align:center}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value))


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()


def _estimate(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def _purity(c: dict[str, Any]) -> str:
    if c.get("purity") is None:
        return ""
    return (f", estimated purity {c['purity']:.2f} ({c.get('used', c['size'])} layers usable, "
            f"{c.get('trimmed', 0)} outliers trimmed)")


def render_html(report: dict[str, Any], map_image: bytes, sheets: dict[int, bytes],
                atypical: dict[str, bytes] | None = None) -> str:
    """The report page; every picture inline."""
    s = report["summary"]
    kinds = list(next(iter(s["by_tier_kind"].values())).keys()) if s["by_tier_kind"] else [UNKNOWN]
    recommended = set(s["recommended_tiers"])
    out = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        "<link rel='icon' href='data:,'>",
        f"<title>Cluster report: {_e(report['run'])}</title><style>{CSS}</style></head><body>",
        f"<h1>Cluster report: {_e(report['run'])}</h1>",
        f"<p class='meta'>{s['layers']} layers, {s['clusters']} clusters, {s['noise_layers']} noise layers "
        f"({100 * s['noise_fraction']:.1f} %), embedder {_e(report['embedder'])}; "
        f"{s['recommended']} clusters recommended (tiers {_e(', '.join(s['recommended_tiers']))}), "
        f"{s['selected_characters']} characters selected. Generated {_e(report['generated_at'])}.</p>",
        "<h2>Tiers</h2><table id='tier-table'><thead><tr><th class='l'>tier</th><th>clusters</th><th>layers</th>",
        *[f"<th>{_e(k)}</th>" for k in kinds], "<th class='l'>status</th></tr></thead><tbody>",
    ]
    for t in TIERS:
        status = "recommended" if t in recommended else ("needs augmentation" if t == "C" else "not recommended")
        out.append(f"<tr><td class='l'><span class='tier t{t}'>{t}</span></td><td>{s['by_tier'][t]}</td>"
                   f"<td>{s['layers_by_tier'][t]}</td>" + "".join(f"<td>{s['by_tier_kind'][t][k]}</td>" for k in kinds)
                   + f"<td class='l'>{status}</td></tr>")
    out.append(f"<tr><td class='l'>noise</td><td></td><td>{s['noise_layers']}</td>" + "<td></td>" * len(kinds)
               + "<td class='l'>not clustered</td></tr></tbody></table>")
    out.append("<h2>Map</h2><p class='meta'>2-D UMAP of the layer embeddings, coloured by cluster; grey: noise.</p>")
    out.append(f"<img id='cluster-map' alt='2-D map of the layers coloured by cluster' width='880' height='600' "
               f"src='{_data_uri(map_image)}'>")
    if report["characters"]:
        out.append("<h2>Selected characters</h2><table id='characters'><thead><tr><th class='l'>character</th>"
                   "<th class='l'>trigger</th><th class='l'>kind</th><th class='l'>clusters</th><th>images</th>"
                   "<th>est. purity</th></tr></thead><tbody>")
        for c in report["characters"]:
            out.append(f"<tr><td class='l'>{_e(c['character'])}</td><td class='l'>{_e(c['trigger'])}</td>"
                       f"<td class='l'>{_e(c['kind'])}</td><td class='l'>{_e(', '.join(map(str, c['cluster_ids'])))}</td>"
                       f"<td>{c['n_images']}</td><td>{_estimate(c.get('purity'))}</td></tr>")
        out.append("</tbody></table>")
    for warning in report["warnings"]:
        out.append(f"<p class='issues'>{_e(warning)}</p>")
    scenery = [c for c in report["clusters"] if c["kind"] == "scenery"]
    for title, group in (("Clusters", [c for c in report["clusters"] if c["kind"] != "scenery"]),
                         ("Scenery (background material, never trained as a character)", scenery)):
        if group or title == "Clusters":
            out.append(f"<h2>{_e(title)}</h2><div class='cards'>")
            out += [_card(c, sheets, atypical or {}) for c in group]
            out.append("</div>")
    out.append("<h2>Overrides</h2><p class='meta'>Tick layers above to exclude them; paste this into the select "
               "overrides file (<code>--set select.overrides=FILE</code>):</p>"
               "<textarea id='overrides' rows='8' cols='80' readonly>layers: {}</textarea>")
    out.append(f"<script>{SCRIPT}</script></body></html>")
    return "\n".join(out)


SCRIPT = """
document.addEventListener('change', () => {
  const ids = [...document.querySelectorAll('input.exclude:checked')].map(b => b.dataset.layer);
  document.getElementById('overrides').value = ids.length
    ? 'layers:\\n' + ids.map(i => '  "' + i + '": {exclude: true}').join('\\n') : 'layers: {}';
});
"""


def _evidence(c: dict[str, Any]) -> str:
    """What says 'character' in a cluster (members holding an anime face, members that move) and how
    clean its layers are (cut by the frame's edge, trimmed of static scenery glued to them)."""
    if c.get("faces") is None:
        return ""
    return (f"; {c['faces']} of {c['size']} hold a face, {c.get('moving', 0)} move, "
            f"{c.get('cut_by_frame', 0)} cut by the frame, {c.get('glue_trimmed', 0)} trimmed of glued scenery")


def _card(c: dict[str, Any], sheets: dict[int, bytes], atypical: dict[str, bytes]) -> str:
    """One cluster's card: tier, kind, purity, measures, samples, least typical layers with exclude boxes."""
    out = []
    colour = "#%02x%02x%02x" % cluster_colour(c["cluster_id"])
    demoted = f" (size tier {c['size_tier']})" if c["size_tier"] != c["tier"] else ""
    who = f" &rarr; <b>{_e(c['character'])}</b> (trigger <code>{_e(c['trigger'])}</code>)" if c["selected"] else ""
    out.append(
        f"<div class='card' id='cluster-{c['cluster_id']}'><h3><span class='tier t{c['tier']}'>{c['tier']}</span>"
        f"<span class='swatch' style='background:{colour}'></span>cluster {c['cluster_id']}{who}</h3>"
        f"<div class='meta'>{c['size']} layers{demoted}, kind {_e(c['kind'])}{_purity(c)}"
        f"{', <span class=rec>recommended</span>' if c['recommended'] else ''}; sharpness {c['mean_sharpness']:.1f}, "
        f"alpha coverage {c['mean_alpha_coverage']:.2f}, duplicates {100 * c['duplicate_ratio']:.0f} %, "
        f"mean layer area {100 * c['mean_layer_area']:.1f} % of the frame{_evidence(c)}</div>"
    )
    for issue in c["quality_issues"]:
        out.append(f"<div class='issues'>{_e(issue)}</div>")
    out.append(f"<img alt='sample layers of cluster {c['cluster_id']}' src='{_data_uri(sheets[c['cluster_id']])}'>")
    if c.get("atypical_ids") and c["kind"] != "scenery":
        out.append("<div class='meta'>least typical first (tick to exclude):</div><div class='atypical'>")
        for item in c["atypical_ids"]:
            thumb = f"<img alt='{_e(item)}' src='{_data_uri(atypical[item])}'>" if item in atypical else ""
            out.append(f"<label class='layer'>{thumb}<br><input type='checkbox' class='exclude' "
                       f"data-layer='{_e(item)}'> {_e(item)}</label>")
        out.append("</div>")
    out.append("</div>")
    return "\n".join(out)


def write_report(store: RunStore, out: Path | None = None, stages: dict[str, str] = RUN_STAGES
                 ) -> tuple[Path, Path, dict[str, Any]]:
    """Write `cluster_report.html` and `.json` (default folder `<run>/report/`) from the stages bound to
    the report's roles. Returns (html, json, data). Raises StageNotDoneError without clusters and tiers."""

    if not (store.is_done(stages["clusters"]) and store.is_done(stages["tiers"])):
        raise StageNotDoneError(f"run '{store.name}' has no finished cluster and tier stages; run it with "
                                f"--until tier (or later) first")
    report = build_report(store, stages)
    clusters = store.read_manifest(stages["clusters"], columns=["cluster_id", "umap_x", "umap_y"])
    xy = np.stack([clusters.column("umap_x").to_numpy(zero_copy_only=False),
                   clusters.column("umap_y").to_numpy(zero_copy_only=False)], axis=1) if clusters.num_rows else np.zeros((0, 2))
    labels = clusters.column("cluster_id").to_numpy(zero_copy_only=False) if clusters.num_rows else np.zeros(0, int)
    sheets = {c["cluster_id"]: contact_sheet(store.root, c["sample_paths"]) for c in report["clusters"]}
    atypical = {item: contact_sheet(store.root, [path], thumb=72, columns=1) for c in report["clusters"]
                if c["kind"] != "scenery" for item, path in zip(c.get("atypical_ids") or [], c.get("atypical_paths") or [])}
    folder = Path(out) if out else store.root / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    html_path, json_path = folder / HTML_NAME, folder / JSON_NAME
    for path, text in ((html_path, render_html(report, map_png(xy, labels), sheets, atypical)),
                       (json_path, json.dumps(report, indent=2, default=str))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return html_path, json_path, report


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
    recommended = set(s["recommended_tiers"])
    for t in TIERS:
        status = "recommended" if t in recommended else ("needs augmentation" if t == "C" else "not recommended")
        table.add_row(t, str(s["by_tier"][t]), str(s["layers_by_tier"][t]),
                      *(str(s["by_tier_kind"][t][k]) for k in kinds), status)
    table.add_row("all", str(s["clusters"]), str(s["layers"] - s["noise_layers"]),
                  *(str(s["by_kind"].get(k, 0)) for k in kinds), f"{s['selected_characters']} characters selected")
    return table
