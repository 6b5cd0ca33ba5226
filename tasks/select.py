"""Stage `select`: the characters to train, with folder-safe names and trigger words.

Batch selection like the Yokai guide's `--tiers S A --min-images 20` (default: the tier
stage's recommended clusters), of clusters whose kind is in `kinds` (default: character only;
scenery is never a character), taking only the layers the tier stage marked used (outliers
trimmed, scenery parts left out), refined by an optional overrides YAML file::

    clusters:
      3: {name: "Hero Boy", trigger: heroboy}   # name / trigger word / kind of a character
      7: {merge_into: 3}                         # cluster 7's layers join cluster 3's character
      9: {exclude: true}                         # never train this cluster
      12: {include: true}                        # train it although its tier or size says no
    layers:
      "ep01:0000123:01": {move_to: 3}            # one layer into another cluster
      "ep01:0000456:02": {exclude: true}         # one layer out

Names become folder names through `tasks.run.store.safe_name` (so `../x` is `x`); without a name a
character is `char_<id:03d>` with trigger `char<id:03d>`, by its cluster id, which the cluster
stage keeps stable across runs. References to clusters or layers that no longer exist are
reported as warnings and ignored; malformed files fail before work starts. A selection of
no character stops the run here (`NothingSelected`) with the largest clusters and the exact
`--set` that would take them.

Clean layers first (`prefer_clean`): a character's layers that show a sign of not being clean (cut
from a glued layer, atypical of their cluster, much larger than the character's median layer or much
narrower than its median shape, or in colours the character's layers from other shots lack: glued
scenery; cut and much smaller: part of the figure lost) are left out, most signs first, while the
character keeps more than `min_images` layers; layers an override moved stay.

Crops (`crops`, as waifuc's three-stage split): a selected layer that holds a face (the segment
stage's `face_box`) also gives a head crop (a square of `HEAD_SCALE` face sides centred on the
face) and an upper-body crop (from a face height above the face down to `UPPER_BODY_DEPTH` face
heights below its top, `UPPER_BODY_WIDTH` face widths wide, centred on the face), each cut from
the layer (clipped to it) into `select/crops/`, as rows of the same character with the item id
`<layer id>#head` / `#upper_body`, `source_id` the layer and `crop` head / upper_body (layers:
full). A crop whose shorter side is under `crop_min_side` frame pixels, or that keeps nearly all
of the layer's character pixels (the full image again), is skipped.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tasks.run.spec import GlobalStage, Inputs
from tasks.run.store import RunStore, safe_name, write_table
from tasks.run.yaml_file import read_yaml_mapping
from tasks.tier import KINDS, MEMBERS, Tier

STAGE = "select"
VERSION = 7  # 3: head and upper-body crops of layers with a face (column `crop`); 4: clean layers preferred;
# 5: characters.parquet counts training images (crops included) and layers (`n_layers`); 6: a layer much narrower
# than the character's usual shape is a sign of scenery glued above or below it; 7: so is a layer with many colours
# the character's layers from other shots lack (tasks/palette.py)
CHARACTERS = "characters.parquet"
CROPS = "crops"
Crop = Literal["full", "upper_body", "head"]
HEAD_SCALE = 2.0
"""Side of a head crop, in face sides (the longer side of the face box), centred on the face."""
UPPER_BODY_DEPTH = 3.5
"""An upper-body crop reaches this many face heights below the face's top ..."""
UPPER_BODY_ABOVE = 1.0
"""... from this many face heights above it (the hair) ..."""
UPPER_BODY_WIDTH = 5.0
"""... and is this many face widths wide, centred on the face (clipped to the layer)."""
SAME_AS_FULL = 0.9
"""A crop keeping more than this share of the layer's character pixels is the full image again: skipped."""
LAYER_MARGIN = 8
"""The segment stage's default `margin`: a layer image's top-left corner is its bbox's less this (clipped at 0)."""

SCHEMA = pa.schema([
    ("item_id", pa.string()),        # the layer
    ("source_id", pa.string()),      # the layer (select passes layers on)
    ("character", pa.string()),      # folder-safe name
    ("trigger", pa.string()),
    ("cluster_id", pa.int32()),      # the layer's cluster (after moves)
    ("kind", pa.string()),
    ("path", pa.string()),           # the RGBA layer (or its crop, under select/crops/), run-relative
    ("crop", pa.string()),           # full | upper_body | head
])
CHARACTER_SCHEMA = pa.schema([
    ("character", pa.string()),
    ("trigger", pa.string()),
    ("kind", pa.string()),
    ("cluster_ids", pa.list_(pa.int32())),
    ("n_images", pa.int64()),        # training images: its layers and their crops (`crops`)
    ("n_layers", pa.int64()),        # the layers they come from
    ("purity", pa.float32()),        # estimated (the tier stage's, weighted by the clusters' usable layers)
])


# ---- the overrides file ---------------------------------------------------------------------------

class OverridesError(ValueError):
    """The overrides file is malformed; the message names the file and the entry."""


class NothingSelected(RuntimeError):
    """No cluster became a character; the message lists the largest clusters and what would take them."""


def _check_trigger(value: str | None) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    if not text or re.search(r"[,\n\r\t]", text):
        raise ValueError(f"trigger must be a non-empty word without commas, tabs or newlines, got {value!r}")
    return text


class ClusterOverride(BaseModel):
    """What the user says about one cluster."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = None
    trigger: str | None = None
    kind: str | None = None
    merge_into: int | None = None
    exclude: bool = False
    include: bool = False

    @field_validator("trigger")
    @classmethod
    def _trigger(cls, value: str | None) -> str | None:
        return _check_trigger(value)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str | None) -> str | None:
        if value is not None and not str(value).strip():
            raise ValueError("name must not be empty")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "ClusterOverride":
        if self.exclude and self.include:
            raise ValueError("exclude and include cannot both be true")
        if self.merge_into is not None and (self.exclude or self.include or self.name or self.trigger or self.kind):
            raise ValueError("a merged cluster takes the name, trigger, kind and selection of the cluster it "
                             "merges into; set those there")
        return self


class LayerOverride(BaseModel):
    """One layer moved to another cluster, or excluded."""

    model_config = ConfigDict(extra="forbid")

    move_to: int | None = None
    exclude: bool = False

    @model_validator(mode="after")
    def _one(self) -> "LayerOverride":
        if (self.move_to is not None) == self.exclude:
            raise ValueError("give exactly one of move_to: <cluster id> or exclude: true")
        return self


class Overrides(BaseModel):
    """The whole overrides file."""

    model_config = ConfigDict(extra="forbid")

    clusters: dict[int, ClusterOverride] = Field(default_factory=dict)
    layers: dict[str, LayerOverride] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _no_cycles(self) -> "Overrides":
        for start in self.clusters:
            seen = [start]
            current = self.clusters[start].merge_into
            while current is not None:
                if current in seen:
                    chain = " -> ".join(map(str, [*seen, current]))
                    raise ValueError(f"merge_into forms a cycle: {chain}")
                seen.append(current)
                nxt = self.clusters.get(current)
                current = nxt.merge_into if nxt else None
        return self

    def root_of(self, cluster_id: int, known: set[int]) -> int:
        """The cluster a cluster ends up in after following merge_into (unknown targets are skipped)."""
        current = cluster_id
        while (entry := self.clusters.get(current)) is not None and entry.merge_into is not None \
                and entry.merge_into in known:
            current = entry.merge_into
        return current


def load_overrides(path: str | Path | None) -> Overrides:
    """Parse and check an overrides file (None: no overrides). Raises OverridesError."""
    if path is None:
        return Overrides()
    path = Path(path)
    data = read_yaml_mapping(path, "overrides", "with 'clusters' and/or 'layers'", OverridesError)
    try:
        return Overrides.model_validate(data)
    except ValidationError as exc:
        lines = [f"invalid overrides file {path}:"]
        for item in exc.errors():
            where = ".".join(str(p) for p in item["loc"]) or "(top level)"
            given = f" (got {item['input']!r})" if "input" in item and not isinstance(item["input"], dict) else ""
            lines.append(f"  {where}: {item['msg']}{given}")
        raise OverridesError("\n".join(lines)) from None


class SelectParams(BaseModel):
    """Which clusters become training characters."""

    model_config = ConfigDict(extra="forbid")

    tiers: list[Tier] | None = Field(None, description="tiers to select (None: the tier stage's recommended clusters)")
    min_images: int = Field(20, ge=1, description="a character needs at least this many layers (include: true overrides)")
    kinds: list[str] = Field(["character"], description="cluster kinds that may be selected (character, mixed; "
                             "scenery is never a character; include: true overrides)")
    overrides: str | None = Field(None, description="path of an overrides YAML file (names, triggers, merges, exclusions, moves)")
    crops: list[Crop] = Field(["full", "upper_body", "head"], description="training images per selected layer: the "
                              "full layer, and for a layer with a face its upper-body and head crops")
    crop_min_side: int = Field(96, ge=16, description="a crop whose shorter side has fewer frame pixels is skipped")
    prefer_clean: bool = Field(True, description="leave out the layers likely not clean (cut from a glued layer, "
                               "atypical of their cluster, larger or much narrower than the character's usual "
                               "size and shape, in colours the character lacks) while the character keeps more "
                               "than min_images layers")

    @field_validator("crops")
    @classmethod
    def _crops(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("crops must name at least one of full, upper_body, head, got []")
        if len(set(value)) != len(value):
            raise ValueError(f"crops must not repeat a kind, got {value}")
        return value

    @field_validator("kinds")
    @classmethod
    def _kinds(cls, value: list[str]) -> list[str]:
        bad = [k for k in value if k not in KINDS or k == "scenery"]
        if bad:
            raise ValueError(f"kinds must be among 'character' and 'mixed' (scenery is never a character), got {bad}")
        return value

    @field_validator("overrides")
    @classmethod
    def _readable(cls, value: str | None) -> str | None:
        if value is None or not str(value).strip():
            return None
        path = Path(value).expanduser().resolve()
        try:
            load_overrides(path)
        except OverridesError as exc:
            raise ValueError(str(exc)) from None
        return str(path)

    def fingerprint_settings(self) -> dict[str, Any]:
        """The parameters and the overrides file's content digest (the fingerprint's settings).
        Raises OverridesError when the file is gone."""
        digest = ""
        if self.overrides:
            try:
                digest = hashlib.sha256(Path(self.overrides).read_bytes()).hexdigest()
            except FileNotFoundError:
                raise OverridesError(f"overrides file not found: {self.overrides} (select.overrides)") from None
        return {**self.model_dump(mode="json"), "overrides_digest": digest}


# ---- selection -----------------------------------------------------------------------------------

def default_name(cluster_id: int) -> tuple[str, str]:
    """(character, trigger) for a cluster the user did not name: char_007 / char007."""
    return f"char_{cluster_id:03d}", f"char{cluster_id:03d}"


def _trigger_from_name(name: str, cluster_id: int) -> str:
    word = re.sub(r"[^a-z0-9]", "", safe_name(name).lower())
    return word or default_name(cluster_id)[1]


def _purity(layers: list[dict], tier_rows: dict[int, dict]) -> float | None:
    """A character's estimated purity: its clusters' estimates weighted by the layers taken from each."""
    estimates = [tier_rows[r["cluster_id"]].get("purity") for r in layers if r["cluster_id"] in tier_rows]
    estimates = [e for e in estimates if e is not None]
    return float(sum(estimates) / len(estimates)) if estimates else None


def passes_batch(tier_row: dict, params: SelectParams) -> bool:
    """Whether one cluster's tier row passes the batch filters: its tier is wanted (default: the tier
    stage recommends it) and its kind is among `params.kinds` (or unknown)."""
    by_tier = tier_row["tier"] in params.tiers if params.tiers is not None else bool(tier_row["recommended"])
    return by_tier and (tier_row.get("kind") or "unknown") in (*params.kinds, "unknown")


def would_select(tier_row: dict, entry: ClusterOverride | None, params: SelectParams, usable: int | None = None,
                 merged: Sequence[dict] = ()) -> bool:
    """The one rule for whether `select` makes a character of a cluster (the merge root of a character).

    Args:
        tier_row: the tier stage's row of the cluster (tier, recommended, kind, size, used).
        entry: the overrides file's entry for it (None: none).
        params: tiers / min_images / kinds.
        usable: the layers the character would train on. `select` counts them after the overrides'
            layer moves and exclusions, without the layers the tier stage did not mark used; the
            default is the tier stage's count, `tier_row.get("used", tier_row["size"])`.
        merged: tier rows of the other clusters merged into it (one passing the tier and kind
            filters is enough).
    Returns:
        False when excluded or when it has no usable layer; else True when included, or when it
        (or a merged cluster) passes the tier and kind filters and has at least `min_images` layers.
    """
    entry = entry or ClusterOverride()
    count = tier_row.get("used", tier_row["size"]) if usable is None else usable
    if entry.exclude or count <= 0:
        return False
    by_tier = any(passes_batch(row, params) for row in (tier_row, *merged))
    return entry.include or (by_tier and count >= params.min_images)


UNCLEAN_TYPICALITY = 1.5
"""A layer this many robust deviations from its cluster's medoid (tier `typicality`) looks unlike its character:
often scenery glued on (measured on the sample and generated footage: 2 of 6 such selected layers clean, 30 of 41 others)."""
UNCLEAN_AREA = 1.3
"""A layer this many times larger than its character's median layer holds more than the character (glued
scenery); one cut from a glued layer and this many times smaller lost part of the figure in the cut."""
UNCLEAN_NARROW = 0.8
"""A layer whose width / height is under this share of its character's median carries something above or below
the figure (a sign over a still head, a window; measured on the used layers of the selected characters of the sample,
generated and anime footage: 9 of 13 such layers unclean, 21 of 140 others). Wider is no sign: a figure cut by the
frame or crouching is wider too."""
UNCLEAN_FOREIGN = 0.05
"""A layer with this much more of its pixels in colours its character lacks (tasks/palette.foreign_shares) than the
character's lower quartile carries something else: glued scenery, background, another figure (measured on the used
layers of the selected characters of the sample, generated and anime footage: 27 of 31 such layers unclean, 10 of 112
others; a clean layer's share, from shading and soft edges, lies within 0.05 of its character's lower quartile)."""


def aspect(segment: dict | None) -> float | None:
    """A layer's box width / height (None: no box)."""
    box = (segment or {}).get("bbox")
    return (box[2] - box[0]) / max(box[3] - box[1], 1) if box else None


def unclean_signs(segment: dict | None, typicality: float | None, median_area: float | None,
                  median_aspect: float | None = None, foreign: float | None = None,
                  usual_foreign: float | None = None) -> list[str]:
    """Why a selected layer is likely not clean (empty: no sign), from its segment row and tier typicality.

    A layer cut by the frame is no sign: anime is framed at the waist (measured: 41 of 45 such anime
    layers clean), and the frame cuts the character as much as the layer."""
    segment = segment or {}
    signs = []
    cut = segment.get("split_from") is not None
    if cut:
        signs.append("cut from a glued layer")
    if typicality is not None and typicality > UNCLEAN_TYPICALITY:
        signs.append(f"atypical of its cluster ({typicality:.1f})")
    area = segment.get("area_frac")
    if area and median_area:
        if area > UNCLEAN_AREA * median_area:
            signs.append(f"{area / median_area:.2f} times the character's median size")
        elif cut and area * UNCLEAN_AREA < median_area:
            signs.append(f"only {area / median_area:.2f} of the character's median size")
    shape = aspect(segment)
    if shape and median_aspect and shape < UNCLEAN_NARROW * median_aspect:
        signs.append(f"{shape / median_aspect:.2f} of the character's median width / height")
    if foreign is not None and usual_foreign is not None and foreign >= usual_foreign + UNCLEAN_FOREIGN:
        signs.append(f"{foreign:.0%} of it in colours its character lacks (usually {usual_foreign:.0%})")
    return signs


def _median(values: list[float | None]) -> float | None:
    """The upper median of the values given (None: none given)."""
    known = sorted(v for v in values if v)
    return known[len(known) // 2] if known else None


def prefer_clean(layers: list[dict], segment: dict[str, dict], typicality: dict[str, float], keep: int,
                 pinned: set[str] = frozenset(), colours: dict[str, np.ndarray] | None = None
                 ) -> tuple[list[dict], list[str]]:
    """One character's layers without those showing signs of not being clean (most signs first, then the
    least typical: a blob of the character's colours that is no figure is atypical), dropped only while more
    than `keep` remain; `pinned` layers (an override moved them) stay. `colours`: layer id -> tasks/palette.colour_shares (None:
    colours are not looked at). Returns (the layers kept in their order, the ids left out)."""
    median_area, median_aspect = (_median([f(segment.get(r["item_id"])) for r in layers])
                                  for f in (lambda row: (row or {}).get("area_frac"), aspect))
    foreign = foreign_colours(layers, segment, colours or {})
    usual = float(np.percentile(list(foreign.values()), 25)) if foreign else None
    risk = {r["item_id"]: len(unclean_signs(segment.get(r["item_id"]), typicality.get(r["item_id"]), median_area,
                                            median_aspect, foreign.get(r["item_id"]), usual)) for r in layers}
    order = sorted((r for r in layers if risk[r["item_id"]] and r["item_id"] not in pinned),
                   key=lambda r: (-risk[r["item_id"]], -(typicality.get(r["item_id"]) or 0.0), r["item_id"]))
    dropped = {r["item_id"] for r in order[:max(len(layers) - keep, 0)]}
    return [r for r in layers if r["item_id"] not in dropped], sorted(dropped)


def foreign_colours(layers: list[dict], segment: dict[str, dict], colours: dict[str, np.ndarray]) -> dict[str, float]:
    """Per layer of one character: the share of it in colours the character's layers from other shots lack
    (tasks/palette.foreign_shares; shots from the segment rows' episode and shot_id)."""
    from tasks.palette import foreign_shares

    known = {r["item_id"]: colours[r["item_id"]] for r in layers if r["item_id"] in colours}
    rows = {item: segment.get(item) or {} for item in known}
    shots = {item: (row.get("episode"), row["shot_id"]) for item, row in rows.items() if row.get("shot_id") is not None}
    return foreign_shares(known, shots)  # a layer without a shot is a shot of its own


def _effective_layers(clusters: pa.Table, members: pa.Table | None, overrides: Overrides, known: set[int],
                      warnings: list[str]) -> dict[str, dict]:
    """Layer id -> its clustered row after the overrides' moves and exclusions; layers the tier stage did
    not mark used are left out unless an override names them."""
    layers = {r["item_id"]: r for r in clusters.to_pylist()}
    if members is not None:
        unused = {r["item_id"] for r in members.select(["item_id", "used"]).to_pylist() if not r["used"]}
        layers = {k: v for k, v in layers.items() if k not in unused or k in overrides.layers}
    for item, entry in sorted(overrides.layers.items()):
        if item not in layers:
            warnings.append(f"layer {item} in the overrides does not exist in this run; ignored")
        elif entry.exclude:
            layers.pop(item)
        elif entry.move_to not in known:
            warnings.append(f"layer {item}: move_to {entry.move_to} is not a cluster of this run; not moved")
        else:
            layers[item] = {**layers[item], "cluster_id": entry.move_to}
    return layers


def _character(root: int, cids: list[int], layers: list[dict], tier_rows: dict[int, dict], entry: ClusterOverride,
               params: SelectParams) -> dict | None:
    """The character made of the clusters `cids` merged into `root` (CHARACTER_SCHEMA), or None when
    `would_select` does not take it."""
    if not would_select(tier_rows[root], entry, params, usable=len(layers),
                        merged=[tier_rows[c] for c in cids if c != root]):
        return None
    name, trigger = default_name(root)
    if entry.name:
        name, trigger = safe_name(entry.name), _trigger_from_name(entry.name, root)
    largest = max(cids, key=lambda c: (tier_rows[c]["size"], -c))
    return {"character": name, "trigger": entry.trigger or trigger,
            "kind": entry.kind or tier_rows[largest].get("sub_kind") or tier_rows[largest]["kind"],
            "cluster_ids": sorted(cids), "n_images": len(layers), "n_layers": len(layers),
            "purity": _purity(layers, tier_rows)}


def select_characters(clusters: pa.Table, tiers: pa.Table, params: SelectParams,
                      overrides: Overrides | None = None, members: pa.Table | None = None,
                      segment: dict[str, dict] | None = None, colours: dict[str, np.ndarray] | None = None
                      ) -> tuple[pa.Table, pa.Table, dict]:
    """Apply batch selection and the overrides.

    Args:
        clusters: cluster manifest (item_id, cluster_id, path).
        tiers: tier manifest (cluster_id, tier, kind, recommended).
        params: tiers / min_images / kinds.
        overrides: the parsed overrides file (None: none).
        members: the tier stage's per-layer verdicts (item_id, used, typicality); layers not used are left
            out unless moved by an override (None: every clustered layer counts).
        segment: layer id -> its segment row (split_from, area_frac, bbox, episode, shot_id) for `prefer_clean`
            (None: only the typicality is looked at).
        colours: layer id -> tasks/palette.colour_shares of its image for `prefer_clean` (None: colours are
            not looked at).
    Returns:
        (selected layers with SCHEMA, characters with CHARACTER_SCHEMA, summary with warnings).
    Raises:
        OverridesError when two characters end up with the same folder name.
    """
    overrides = overrides or Overrides()
    warnings: list[str] = []
    tier_rows = {r["cluster_id"]: r for r in tiers.to_pylist()}
    known = set(tier_rows)
    for cid, entry in sorted(overrides.clusters.items()):
        if cid not in known:
            warnings.append(f"cluster {cid} in the overrides does not exist in this run; ignored")
        elif entry.merge_into is not None and entry.merge_into not in known:
            warnings.append(f"cluster {cid}: merge_into {entry.merge_into} does not exist in this run; not merged")
    layers = _effective_layers(clusters, members, overrides, known, warnings)
    groups: dict[int, list[int]] = {}
    for cid in sorted(known):
        groups.setdefault(overrides.root_of(cid, known), []).append(cid)
    members_of: dict[int, list[dict]] = {root: [] for root in groups}
    root_of = {cid: root for root, cids in groups.items() for cid in cids}
    for row in layers.values():
        if row["cluster_id"] in root_of:
            members_of[root_of[row["cluster_id"]]].append(row)

    typicality = {} if members is None or "typicality" not in members.column_names else \
        dict(zip(members.column("item_id").to_pylist(), members.column("typicality").to_pylist()))
    characters, rows, names, unclean = [], [], {}, {}
    for root, cids in sorted(groups.items()):
        layers_c = sorted(members_of[root], key=lambda r: r["item_id"])
        if params.prefer_clean and len(layers_c) > params.min_images:
            layers_c, unclean[root] = prefer_clean(layers_c, segment or {}, typicality, params.min_images,
                                                   set(overrides.layers), colours)
        character = _character(root, cids, layers_c, tier_rows, overrides.clusters.get(root, ClusterOverride()), params)
        if character is None:
            continue
        name = character["character"]
        if name in names:
            raise OverridesError(f"clusters {names[name]} and {root} would both be the character folder {name!r}; "
                                 f"give them different names, or merge them with merge_into")
        names[name] = root
        characters.append(character)
        rows += [{"item_id": r["item_id"], "source_id": r["item_id"], "character": name,
                  "trigger": character["trigger"], "cluster_id": r["cluster_id"], "kind": character["kind"],
                  "path": r["path"], "crop": "full"} for r in layers_c]
    summary = {
        "characters": len(characters), "kept": len(rows), "images": len(rows),
        "clusters_considered": len(known),
        "excluded_clusters": sum(overrides.clusters.get(root, ClusterOverride()).exclude for root in groups),
        "tiers": list(params.tiers) if params.tiers is not None else "recommended",
        "min_images": params.min_images, "kinds": list(params.kinds), "warnings": warnings,
        "left_out_unclean": sum(len(unclean.get(names[c["character"]], [])) for c in characters),
        "names": {c["character"]: c["trigger"] for c in characters},
        "purity": {c["character"]: None if c["purity"] is None else round(c["purity"], 3) for c in characters},
    }
    return pa.Table.from_pylist(rows, schema=SCHEMA), pa.Table.from_pylist(characters, schema=CHARACTER_SCHEMA), summary


# ---- head and upper-body crops -------------------------------------------------------------------

def crop_boxes(face_box: list[int], origin: tuple[int, int], size: tuple[int, int]) -> dict[str, tuple[int, int, int, int]]:
    """The head and upper-body boxes (x0, y0, x1, y1, exclusive ends) in a layer's pixels, clipped to it.

    Args:
        face_box: the face's [x0, y0, x1, y1] in frame pixels.
        origin: the frame position of the layer image's top-left corner.
        size: the layer image's (width, height).
    """
    fx0, fy0 = face_box[0] - origin[0], face_box[1] - origin[1]
    fw, fh = max(face_box[2] - face_box[0], 1), max(face_box[3] - face_box[1], 1)
    cx, cy, half = fx0 + fw / 2, fy0 + fh / 2, HEAD_SCALE * max(fw, fh) / 2
    boxes = {"head": (cx - half, cy - half, cx + half, cy + half),
             "upper_body": (cx - UPPER_BODY_WIDTH * fw / 2, fy0 - UPPER_BODY_ABOVE * fh,
                            cx + UPPER_BODY_WIDTH * fw / 2, fy0 + UPPER_BODY_DEPTH * fh)}
    w, h = size
    return {kind: (max(0, round(x0)), max(0, round(y0)), min(w, round(x1)), min(h, round(y1)))
            for kind, (x0, y0, x1, y1) in boxes.items()}


def layer_origin(bbox: list[int], margin: int) -> tuple[int, int]:
    """Where a layer image's top-left corner sits in its frame (tasks/segment.layer_frame)."""
    return max(bbox[0] - margin, 0), max(bbox[1] - margin, 0)


def cut_crops(root: Path, rows: list[dict], faces: dict[str, dict], params: SelectParams, out: Path, prefix: str,
              margin: int = LAYER_MARGIN) -> tuple[list[dict], dict[str, int]]:
    """Cut the head and upper-body crops `params.crops` asks for from the selected layers that hold a face.

    Args:
        root: the run folder (row paths are relative to it).
        rows: selected layers (SCHEMA rows, crop full).
        faces: layer item id -> its segment row (bbox, face_box) for layers with a face.
        params: crops, crop_min_side.
        out: folder the crop images go into; `prefix`: its run-relative path.
        margin: the segment stage's margin (where a layer sits in its frame).
    Returns:
        (crop rows with SCHEMA, counts: crops made per kind and skipped per reason).
    """
    kinds = [k for k in ("upper_body", "head") if k in params.crops]
    counts = {**{k: 0 for k in kinds}, "too_small": 0, "whole_layer": 0, "unreadable": 0}
    crops: list[dict] = []
    for row in rows:
        segment_row = faces.get(row["item_id"])
        if not kinds or segment_row is None:
            continue
        try:
            with Image.open(root / row["path"]) as im:
                layer = np.asarray(im.convert("RGBA"))
        except (OSError, ValueError):
            counts["unreadable"] += 1
            continue
        character = layer[..., 3] > 8
        boxes = crop_boxes(segment_row["face_box"], layer_origin(segment_row["bbox"], margin), layer.shape[1::-1])
        for kind in kinds:
            x0, y0, x1, y1 = boxes[kind]
            if min(x1 - x0, y1 - y0) < params.crop_min_side:
                counts["too_small"] += 1
                continue
            if character[y0:y1, x0:x1].sum() > SAME_AS_FULL * character.sum():
                counts["whole_layer"] += 1
                continue
            name = f"{safe_name(row['item_id'], max_len=100)}_{kind}.png"
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(layer[y0:y1, x0:x1]), "RGBA").save(out / name, compress_level=3)
            crops.append({**row, "item_id": f"{row['item_id']}#{kind}", "source_id": row["item_id"],
                          "path": f"{prefix}/{name}", "crop": kind})
            counts[kind] += 1
    return crops, counts


def _faces(segment: pa.Table) -> dict[str, dict]:
    """Layer item id -> {bbox, face_box} of the segment rows that hold a face."""
    if "face_box" not in segment.column_names:
        return {}
    return {r["item_id"]: r for r in segment.select(["item_id", "bbox", "face_box"]).to_pylist()
            if r["face_box"] and r["bbox"]}


def _clean_fields(segment: pa.Table | None) -> dict[str, dict]:
    """Layer item id -> {split_from, area_frac, bbox, episode, shot_id} of the segment rows (what `prefer_clean`
    reads)."""
    if segment is None:
        return {}
    fields = [f for f in ("item_id", "split_from", "area_frac", "bbox", "episode", "shot_id")
              if f in segment.column_names]
    return {r["item_id"]: r for r in segment.select(fields).to_pylist()}


def layer_colours(root: Path, clusters: pa.Table) -> dict[str, np.ndarray]:
    """Layer item id -> tasks/palette.colour_shares of its RGBA image (paths relative to `root`), for the
    clustered layers (noise, -1, is never selected); a layer whose image cannot be read has none."""
    from tasks.palette import colour_shares

    out = {}
    for row in clusters.select(["item_id", "cluster_id", "path"]).to_pylist():
        if row["cluster_id"] == -1 or not row["path"]:
            continue
        try:
            with Image.open(root / row["path"]) as image:
                out[row["item_id"]] = colour_shares(np.asarray(image.convert("RGBA")))
        except OSError:  # missing or unreadable: no colours, so no colour sign
            continue
    return out


def nothing_selected_message(tiers: pa.Table, params: SelectParams, shown: int = 5) -> str:
    """Why nothing was selected: the largest clusters (size, tier, kind) and the `--set` that takes them."""
    rows = sorted(tiers.to_pylist(), key=lambda r: (-r.get("used", r["size"]), r["cluster_id"]))
    if not rows:
        return ("select: no character selected, because clustering found no cluster (every layer is noise); "
                "try --set cluster.min_cluster_size=3 --set cluster.min_samples=2, or more episodes")
    lines = [f"select: no character selected (tiers {list(params.tiers) if params.tiers else 'recommended'}, "
             f"min_images {params.min_images}, kinds {list(params.kinds)}). The largest clusters:"]
    for r in rows[:shown]:
        lines.append(f"  cluster {r['cluster_id']}: {r.get('used', r['size'])} usable layers of {r['size']}, "
                     f"tier {r['tier']}, kind {r['kind']}")
    takeable = [r for r in rows if r["kind"] != "scenery"]
    if takeable:
        top = takeable[:shown]
        tiers_needed = sorted({r["tier"] for r in top} | set(params.tiers or []), key="SABCD".index)
        smallest = min(r.get("used", r["size"]) for r in top)
        sets = [f"--set select.tiers=[{','.join(tiers_needed)}]", f"--set select.min_images={max(smallest, 1)}"]
        kinds = sorted({r["kind"] for r in top} - {"unknown"} | set(params.kinds))
        if kinds != sorted(params.kinds):
            sets.append(f"--set select.kinds=[{','.join(kinds)}]")
        lines.append("To train the largest non-scenery clusters above: " + " ".join(sets))
    else:
        lines.append("Every cluster is scenery: the layers are background, not characters. Try "
                     "--set segment.model=isnet-anime (or a detector: --set segment.detector=<person.onnx>).")
    return "\n".join(lines)


def with_image_counts(characters: pa.Table, rows: list[dict]) -> pa.Table:
    """`characters` with `n_images` counting each character's training images in `rows` (crops included;
    `select_characters` counts the layers, as it cuts no crops)."""
    images = Counter(row["character"] for row in rows)
    counts = pa.array([images[name] for name in characters.column("character").to_pylist()], pa.int64())
    return characters.set_column(characters.schema.get_field_index("n_images"), "n_images", counts)


# ---- the stage -----------------------------------------------------------------------------------

def build_select(store: RunStore, params: Any, inputs: Inputs, folder: Path) -> tuple[pa.Table, dict, list[str]]:
    """Read the cluster and tier manifests, select, and cut the crops of the layers the `segment` input
    (when handed) says hold a face, where the segment stage's `margin` put them in their frames."""
    own = params.select
    clusters, tiers = (store.read_manifest(inputs[role].stage) for role in ("cluster", "tier"))
    members_path = store.stage_dir(inputs["tier"].stage) / MEMBERS
    members = pq.read_table(members_path) if members_path.is_file() else None
    segment = store.read_manifest(inputs["segment"].stage) if "segment" in inputs else None
    colours = layer_colours(store.root, clusters) if own.prefer_clean and segment is not None else None
    table, characters, summary = select_characters(clusters, tiers, own, load_overrides(own.overrides), members,
                                                   _clean_fields(segment), colours)
    if not characters.num_rows:
        raise NothingSelected(nothing_selected_message(tiers, own))
    shutil.rmtree(folder / CROPS, ignore_errors=True)  # crops of an earlier selection go
    faces = _faces(segment) if segment is not None else {}
    layers = table.to_pylist()
    crops, counts = cut_crops(store.root, layers, faces, own, folder / CROPS, f"{STAGE}/{CROPS}", params.segment.margin)
    crops_of: dict[str, list[dict]] = {}
    for crop in crops:
        crops_of.setdefault(crop["source_id"], []).append(crop)
    rows = [row for layer in layers
            for row in ([layer] if "full" in own.crops else []) + crops_of.get(layer["item_id"], [])]
    summary.update(images=len(rows), layers_with_face=sum(r["item_id"] in faces for r in layers), crops=counts)
    write_table(with_image_counts(characters, rows), folder / CHARACTERS)
    return pa.Table.from_pylist(rows, schema=SCHEMA), summary, [f"{STAGE}/{CHARACTERS}"]


SELECT = GlobalStage(
    name=STAGE, version=VERSION, params=SelectParams, inputs=("cluster", "tier"), optional=("segment",),
    reads=(STAGE, "segment.margin"), title="selected characters", build=build_select,
    rows=lambda store, result: pq.read_table(store.stage_dir(STAGE) / CHARACTERS).to_pylist(),
)
"""The select stage: the characters to train, with their names and triggers."""
