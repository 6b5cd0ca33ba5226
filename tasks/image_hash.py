"""Perceptual hashes of images and the Hamming distances between them (near-duplicate checks)."""

from __future__ import annotations

import cv2
import numpy as np


def perceptual_hash(gray: np.ndarray) -> int:
    """64-bit DCT perceptual hash of a grayscale image."""
    small = cv2.resize(gray, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    low = cv2.dct(small)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(np.packbits(bits).view(">u8")[0])


def hamming_to_all(value: int, others: np.ndarray) -> np.ndarray:
    """The number of bits in which `value` differs from each of `others` (uint64 hashes)."""
    return np.bitwise_count(np.bitwise_xor(others, np.uint64(value)))
