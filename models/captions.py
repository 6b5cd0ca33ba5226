"""Captions as kohya sd-scripts feeds them to the text encoder, per example and per step.

kohya's documented rules (`shuffle_caption`, `keep_tokens`, `caption_dropout_rate`,
`caption_tag_dropout_rate`): with probability `caption_dropout_rate` the whole caption becomes
empty; otherwise, when shuffling or tag dropout is on, the caption is split at commas (each tag
stripped), the first `keep_tokens` tags stay in front in their order (the trigger word), the
rest are shuffled, each of them is then dropped with probability `caption_tag_dropout_rate`, and
the tags are joined again with ", ". Every draw comes from the `random.Random` handed in, so a
seeded training sees the same captions on every run and after a resume.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class CaptionRules:
    """How captions are varied during training (kohya dataset-config names)."""

    shuffle_caption: bool = False
    keep_tokens: int = 0
    caption_dropout_rate: float = 0.0
    caption_tag_dropout_rate: float = 0.0

    @property
    def varies(self) -> bool:
        """True when the same caption can reach the text encoder in different forms."""
        return self.shuffle_caption or self.caption_dropout_rate > 0 or self.caption_tag_dropout_rate > 0

    @property
    def rewrites(self) -> bool:
        """True when kohya re-joins the tags (shuffle or tag dropout), normalising the spacing."""
        return self.shuffle_caption or self.caption_tag_dropout_rate > 0


def process_caption(caption: str, rules: CaptionRules, rng: random.Random) -> str:
    """The caption one training step sees (see the module docstring for the rules).

    >>> process_caption("zqx, red, cat", CaptionRules(keep_tokens=1), random.Random(0))
    'zqx, red, cat'
    """
    if rules.caption_dropout_rate > 0 and rng.random() < rules.caption_dropout_rate:
        return ""
    if not rules.rewrites:
        return caption
    tags = [t.strip() for t in caption.strip().split(",")]
    fixed, flex = tags[: rules.keep_tokens], tags[rules.keep_tokens:]
    if rules.shuffle_caption:
        rng.shuffle(flex)
    if rules.caption_tag_dropout_rate > 0:
        flex = [t for t in flex if rng.random() >= rules.caption_tag_dropout_rate]
    return ", ".join(fixed + flex)
