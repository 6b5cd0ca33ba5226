"""Build the render folder and the photo set that the source runs of the compare check start from.

    python -m benchmarks.make_sources OUT        # writes OUT/renders/ and OUT/photos/

The same sources the flow tests use (tests/test_renders.py, tests/test_photos.py), drawn by
tests/source_fixtures.py, so a run on them is small and fast on a CPU:

- `renders/`: two phase folders of six 64x64 turntable renders each, with captions
  (phase_1_essential, phase_3_details: stage 1 and stage 2 of the staged training);
- `photos/`: six photos in the images+captions layout, photo05's caption left out (so the
  template captioner writes one).

Deterministic: the drawings are seeded, so the files are byte-identical on every build. An
existing OUT/renders or OUT/photos is left as it is (the before and after runs must read the
same files at the same paths).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/ of this checkout

from tests.source_fixtures import write_photos, write_sequence  # noqa: E402

SEQUENCES = {"phase_1_essential": "FULL_ASSEMBLY_FLAT_MID_360_64x64",
             "phase_3_details": "COPPER_PINS_TOP_HIGH_360_64x64"}


def make_renders(folder: Path) -> None:
    """Two phase folders of six 64x64 renders with captions, as the renders flow test writes them."""
    for phase, sequence in SEQUENCES.items():
        write_sequence(folder / phase, sequence, 6)


def make_photos(folder: Path) -> None:
    """Six photos (images/ + captions/), one caption missing, as the photos flow test writes them."""
    write_photos(folder, 6, layout="images+captions")
    (folder / "captions" / "photo05.txt").unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="folder to write renders/ and photos/ into")
    out = parser.parse_args(argv).out
    for name, make in (("renders", make_renders), ("photos", make_photos)):
        if (out / name).exists():
            print(f"{out / name}: exists, kept")
        else:
            make(out / name)
            print(f"{out / name}: written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
