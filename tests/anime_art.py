"""Anime-style character art and scenery from Debian packages, to test the face detector on.

Why this art: the face detector must be shown to work on real anime-style drawings, not on
shapes drawn for the test, and tests never download from a hub. The Ren'Py visual-novel engine's
example games, packaged in Debian main (`renpy-thequestion`, `renpy-demo`; the art is under the
Expat licence per their `copyright` files), ship finished anime-style character sprites by
professional illustrators (Sylvie of "The Question" in two outfits and four expressions; Eileen
and Lucy of the demo) and photo and painted backgrounds of the same games. Every sprite shows one
whole frontal face, so each must give exactly one detection; the backgrounds hold no face.
(The Live2D texture atlases on npm hold faces only in parts, and whole rendered Live2D faces need
the headless-Chromium renderer of tests/anime_footage.py.)

Nothing of it is committed: `ensure_art()` fetches the two .deb files with `apt-get download`
(no install; `apt-get update` first when the package lists are missing), unpacks them with
`dpkg-deb` and copies the images used here into `<repo>/.cache/anime_art/`.

    python -m tests.anime_art      # fetch once, print the folder
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
ART_HOME = REPO / ".cache" / "anime_art"
GAMES = "usr/share/games/renpy"

# name -> (Debian package, path inside it)
SPRITES: dict[str, tuple[str, str]] = {
    **{f"sylvie {outfit} {mood}": ("renpy-thequestion", f"{GAMES}/the_question/game/images/sylvie {outfit} {mood}.png")
       for outfit in ("blue", "green") for mood in ("normal", "giggle", "smile", "surprised")},
    **{f"eileen {mood}": ("renpy-demo", f"{GAMES}/demo/game/images/eileen {mood}.png")
       for mood in ("happy", "vhappy", "concerned")},
    **{f"lucy {mood}": ("renpy-demo", f"{GAMES}/demo/game/images/lucy {mood}.png") for mood in ("happy", "mad")},
}
SCENERY: dict[str, tuple[str, str]] = {
    **{f"bg {place}": ("renpy-thequestion", f"{GAMES}/the_question/game/images/bg {place}.jpg")
       for place in ("club", "lecturehall", "meadow", "uni")},
    **{f"bg {place}": ("renpy-demo", f"{GAMES}/demo/game/images/bg {place}.jpg")
       for place in ("cave", "washington", "whitehouse")},
}
PACKAGES = ("renpy-thequestion", "renpy-demo")


def _file(name: str) -> Path:
    member = {**SPRITES, **SCENERY}[name][1]
    return ART_HOME / Path(member).name


def _download(folder: Path) -> None:
    if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
        raise RuntimeError("apt-get and dpkg-deb are needed to fetch the anime test art (Debian packages "
                           f"{', '.join(PACKAGES)}); see tests/anime_art.py")
    cmd = ["apt-get", "download", "-qq", *PACKAGES]
    done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:  # no package lists yet on a fresh machine
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
        done = subprocess.run(cmd, cwd=folder, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"could not fetch {', '.join(PACKAGES)} with apt-get download: {done.stderr.strip()[-500:]}")


def ensure_art() -> Path:
    """The folder holding every image named in SPRITES and SCENERY, fetched once."""
    names = [*SPRITES, *SCENERY]
    if all(_file(n).is_file() for n in names):
        return ART_HOME
    ART_HOME.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        os.chmod(tmp, 0o755)  # apt's download user must be able to write here
        _download(tmp)
        unpacked = tmp / "unpacked"
        for deb in tmp.glob("*.deb"):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(unpacked)], check=True, capture_output=True)
        for name in names:
            source = unpacked / {**SPRITES, **SCENERY}[name][1]
            if not source.is_file():
                raise RuntimeError(f"{source.relative_to(unpacked)} is not in the downloaded packages {PACKAGES}")
            part = ART_HOME / f".{uuid.uuid4().hex}.tmp"
            shutil.copyfile(source, part)
            os.replace(part, _file(name))
    return ART_HOME


def load(name: str, *, background: int = 255) -> np.ndarray:
    """An art image as RGB uint8; a sprite's transparency composited over grey level `background`."""
    from PIL import Image

    ensure_art()
    with Image.open(_file(name)) as im:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
    alpha = rgba[:, :, 3:] / 255.0
    return (rgba[:, :, :3] * alpha + background * (1.0 - alpha) + 0.5).astype(np.uint8)


def alpha(name: str) -> np.ndarray:
    """A sprite's alpha channel, uint8 (H, W)."""
    from PIL import Image

    ensure_art()
    with Image.open(_file(name)) as im:
        return np.asarray(im.convert("RGBA"))[:, :, 3]


if __name__ == "__main__":
    print(ensure_art())
