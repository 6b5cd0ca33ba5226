"""A tiny randomly-initialised BLIP2 captioner (OPT decoder), for tests, benchmarks and offline demos.

It has the real classes and file layout (`Blip2ForConditionalGeneration` + `Blip2Processor`),
so it loads through exactly the code path a hub checkpoint uses (`from_pretrained(local dir)`).
Its captions are meaningless: it exercises the plumbing without a download.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import uuid
from pathlib import Path

TINY_CACHE = Path(__file__).resolve().parent.parent / ".cache"

_WORDS = (
    "anime character standing sitting walking running jumping smiling angry sad surprised looking left right "
    "front side back view full body upper close up portrait red blue green yellow orange purple pink brown black "
    "white grey shirt jacket hat hair dress uniform cape robot creature cat dog fox bird monster small large "
    "street room forest sky city field park school house indoor outdoor bright dim soft light shadow evening "
    "morning night plain background scene with and the a of in on at holding waving pointing arms raised pose"
).split()


def _corpus(lines: int = 400, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 9))) for _ in range(lines)]


def train_tiny_opt_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained locally, wrapped as a fast tokenizer (OPT-style specials)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                  initial_alphabet=sorted(pre_tokenizers.ByteLevel.alphabet()), show_progress=False)
    bpe.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="</s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def build_tiny_blip2(path: Path | str, seed: int = 0, num_query_tokens: int = 4) -> Path:
    """Build and save a tiny `Blip2ForConditionalGeneration` with its `Blip2Processor` into `path`.

    Vision: 32 px images in 8 px patches; vision, Q-Former and OPT all hidden 32 with 2 layers;
    a 300-token BPE tokenizer. The processor carries `num_query_tokens` (transformers 5 expands
    the `<image>` placeholder in the processor) and the config the `<image>` token id. The
    embeddings of special, punctuation and byte tokens are zeroed (tied to the output layer),
    so greedy decoding emits plain words and runs to `max_new_tokens` (stable timings). Written to a temporary folder and renamed. Returns the folder.
    """
    import torch
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2Processor, Blip2QFormerConfig,
                              Blip2VisionConfig, BlipImageProcessorPil, OPTConfig)

    tokenizer = train_tiny_opt_tokenizer()
    image_processor = BlipImageProcessorPil(size={"height": 32, "width": 32})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tokenizer, num_query_tokens=num_query_tokens)
    vision = Blip2VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=32, patch_size=8)
    qformer = Blip2QFormerConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                 encoder_hidden_size=32, vocab_size=64, max_position_embeddings=64)
    text = OPTConfig(vocab_size=len(tokenizer), hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                     num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=256,
                     pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                     eos_token_id=tokenizer.eos_token_id)
    config = Blip2Config(vision_config=vision.to_dict(), qformer_config=qformer.to_dict(), text_config=text.to_dict(),
                         num_query_tokens=num_query_tokens,
                         image_token_index=tokenizer.convert_tokens_to_ids("<image>"))
    torch.manual_seed(seed)
    model = Blip2ForConditionalGeneration(config).eval()
    with torch.no_grad():  # only plain-word tokens can win greedy decoding: readable, never-empty captions
        weight = model.get_input_embeddings().weight
        for token_id in range(len(tokenizer)):
            text = tokenizer.decode([token_id])
            if token_id in tokenizer.all_special_ids or not text.strip() or not re.fullmatch(r" ?[a-z]+", text):
                weight[token_id].zero_()

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    model.save_pretrained(tmp)
    processor.save_pretrained(tmp)
    (tmp / "README.md").write_text("Tiny randomly-initialised BLIP2 stand-in built by episode2lora "
                                   "(models/tiny_blip2.py). NOT a trained captioner: use e.g. "
                                   "Salesforce/blip2-opt-2.7b for real captions.\n")
    try:
        os.rename(tmp, out)
    except OSError:  # built by another process meanwhile (or `out` is a non-empty folder)
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "processor_config.json").is_file():
            raise
    return out


def ensure_tiny_blip2(cache: Path | None = None) -> Path:
    """The folder of the tiny BLIP2 captioner (`blip2:tiny`), built once under `<repo>/.cache/`."""
    path = Path(cache or TINY_CACHE) / "tiny-blip2"
    if not (path / "processor_config.json").is_file():
        build_tiny_blip2(path)
    return path
