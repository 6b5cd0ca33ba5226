"""Stage `package`: kohya tree and names, validation split, the parameter table, TOML keys kohya
accepts, the AI-Toolkit YAML, rendering, multi-concept and background options."""

from __future__ import annotations

import json
import math
import re
import tomllib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image
from pydantic import ValidationError

from tasks.package import (BackgroundDatasetParams, PackageParams, kohya_dataset, kohya_subset, kohya_training,
                           pick_backgrounds, thumbnail_embedding, training_plan)
from tasks.composite import wrapped_pixels
from tests.dataset_fixtures import make_run
from tests.stages import run_plain

# ---- what kohya sd-scripts accepts (library/config_util.py ConfigSanitizer schemas; train_network.py
# and library/train_util.py argparse options), written down from the source ----------------------
SUBSET_ASCENDABLE = {"color_aug", "face_crop_aug_range", "flip_aug", "num_repeats", "random_crop", "shuffle_caption",
                     "keep_tokens", "keep_tokens_separator", "secondary_separator", "enable_wildcard",
                     "token_warmup_min", "token_warmup_step", "caption_prefix", "caption_suffix"}
DO_SUBSET_ASCENDABLE = {"caption_dropout_every_n_epochs", "caption_dropout_rate", "caption_tag_dropout_rate"}
DB_SUBSET_ASCENDABLE = {"caption_extension", "class_tokens", "cache_info"}
DB_SUBSET_DISTINCT = {"image_dir", "is_reg", "alpha_mask"}  # alpha_mask: subsets only, not [general]/[[datasets]]
DATASET_ASCENDABLE = {"batch_size", "bucket_no_upscale", "bucket_reso_steps", "enable_bucket", "max_bucket_reso",
                      "min_bucket_reso", "resolution", "network_multiplier"}
GENERAL_KEYS = DATASET_ASCENDABLE | SUBSET_ASCENDABLE | DB_SUBSET_ASCENDABLE | DO_SUBSET_ASCENDABLE
DATASET_KEYS = GENERAL_KEYS | {"subsets"}
SUBSET_KEYS = SUBSET_ASCENDABLE | DB_SUBSET_DISTINCT | DB_SUBSET_ASCENDABLE | DO_SUBSET_ASCENDABLE
TRAIN_NETWORK_KEYS = {
    "pretrained_model_name_or_path", "dataset_config", "output_dir", "output_name", "save_model_as", "save_precision",
    "save_every_n_epochs", "network_module", "network_dim", "network_alpha", "unet_lr", "text_encoder_lr",
    "optimizer_type", "lr_scheduler", "max_train_epochs", "mixed_precision", "gradient_checkpointing", "cache_latents",
    "min_snr_gamma", "noise_offset", "caption_dropout_rate", "sample_prompts", "sample_every_n_epochs",
    "sample_sampler", "seed", "logging_dir", "max_data_loader_n_workers", "train_batch_size", "learning_rate",
}
KOHYA_FOLDER = re.compile(r"^(\d+)_(.+)$")


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    """hero (human, 6 -> 42 images) and blob (creature, 5 -> 35), captioned by the template."""
    store = make_run(tmp_path_factory.mktemp("pkg"), {"hero": ("human", 6), "blob": ("creature", 5)})
    result = run_plain(store, "package", after="select", package=PackageParams())
    return store, result


def _characters(store):
    return {r["character"]: r for r in pq.read_table(store.stage_dir("package") / "characters.parquet").to_pylist()}


# ---- the parameter table -------------------------------------------------------------------------

@pytest.mark.parametrize("n,repeats,epochs,unet,te", [
    (5, 30, 30, 5e-5, 2e-5), (10, 30, 30, 5e-5, 2e-5), (11, 20, 25, 8e-5, 3e-5), (20, 20, 25, 8e-5, 3e-5),
    (21, 15, 20, 1e-4, 5e-5), (50, 15, 20, 1e-4, 5e-5), (51, 10, 15, 1e-4, 5e-5), (100, 10, 15, 1e-4, 5e-5),
    (101, 5, 12, 1e-4, 5e-5), (900, 5, 12, 1e-4, 5e-5)])
def test_parameter_table(n, repeats, epochs, unet, te):
    params = PackageParams()
    human = training_plan(n, "human", params)
    assert (human["repeats"], human["epochs"], human["unet_lr"], human["text_encoder_lr"]) == (repeats, epochs, unet, te)
    assert (human["network_dim"], human["network_alpha"]) == (32, 16)
    assert human["total_steps"] == n * repeats * epochs
    creature = training_plan(n, "creature", params)
    assert (creature["network_dim"], creature["network_alpha"]) == (48, 24)
    assert creature["unet_lr"] == pytest.approx(unet * 1.1) and creature["text_encoder_lr"] == pytest.approx(te * 1.1)
    assert training_plan(n, "human", PackageParams(batch_size=4))["total_steps"] == math.ceil(n * repeats * epochs / 4)


# ---- the tree ----------------------------------------------------------------------------------

def test_tree_names_parse_as_kohya_expects(packaged):
    store, result = packaged
    root = store.stage_dir("package")
    characters = _characters(store)
    train = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in ("configs", "validation"))
    assert train == sorted(f"{c['repeats']}_{name}" for name, c in characters.items())
    for folder in train:
        repeats, name = KOHYA_FOLDER.match(folder).groups()
        c = characters[name]
        assert int(repeats) == c["repeats"] == training_plan(c["n_train"], c["kind"], PackageParams())["repeats"]
        images = sorted((root / folder).glob("*.png"))
        assert len(images) == c["n_train"]
        assert sorted(p.stem for p in (root / folder).glob("*.txt")) == [p.stem for p in images]
        assert len(list((root / "validation" / name).glob("*.png"))) == c["n_validation"] >= 1
    assert characters["blob"]["kind"] == "creature" and characters["blob"]["network_dim"] == 48
    assert result.summary["total_steps"] == {n: c["total_steps"] for n, c in characters.items()}
    hero = characters["hero"]
    assert f"hero: {hero['n_train']} images x {hero['repeats']} repeats x {hero['epochs']} epochs / batch 1 = " \
           f"{hero['n_train'] * hero['repeats'] * hero['epochs']} steps" in result.summary["steps"]


def test_manifest_rows_match_the_files(packaged):
    store, _ = packaged
    table = store.read_manifest("package")
    assert table.column_names[:10] == ["item_id", "source_id", "character", "trigger", "kind", "split", "repeats",
                                       "path", "caption_path", "caption"]
    captions = {r["item_id"]: r for r in store.read_manifest("caption").to_pylist()}
    for row in table.to_pylist():
        image = Image.open(store.root / row["path"])
        assert image.mode == "RGBA" and image.size == (512, 512)  # alpha = the character mask
        text = (store.root / row["caption_path"]).read_text().strip()
        assert text == row["caption"] == captions[row["item_id"]]["caption"] and text.startswith(row["trigger"] + ", ")
        assert row["split"] in ("train", "validation")
        expected = f"package/validation/{row['character']}/" if row["split"] == "validation" else f"package/{row['repeats']}_{row['character']}/"
        assert row["path"].startswith(expected)


def test_validation_split_keeps_an_original_and_its_copies_together(packaged):
    store, _ = packaged
    groups = {r["item_id"]: r["group_id"] for r in store.read_manifest("caption").to_pylist()}
    rows = store.read_manifest("package").to_pylist()
    for character, originals in (("hero", 6), ("blob", 5)):
        mine = [r for r in rows if r["character"] == character]
        held = {groups[r["item_id"]] for r in mine if r["split"] == "validation"}
        trained = {groups[r["item_id"]] for r in mine if r["split"] == "train"}
        assert not held & trained
        assert len(held) == max(1, round(originals * 0.1))


def test_background_swaps_are_rendered_onto_the_background_layer(packaged):
    store, _ = packaged
    caption = {r["item_id"]: r for r in store.read_manifest("caption").to_pylist()}
    swapped = plain = 0
    for row in store.read_manifest("package").to_pylist():
        corner = np.asarray(Image.open(store.root / row["path"]).convert("RGB"))[:24, :24].reshape(-1, 3)
        if caption[row["item_id"]]["background_path"]:
            swapped += 1
            assert not (corner == 255).all()
        else:
            plain += 1
            assert (corner == 255).all()
    assert swapped and plain


def test_no_packaged_image_has_wrapped_colours(packaged):
    """Over the whole packaged run: no channel wrapped past 255 anywhere (tasks/composite.render clips)."""
    store, _ = packaged
    rows = store.read_manifest("package").to_pylist()
    wrapped = {row["path"]: wrapped_pixels(np.asarray(Image.open(store.root / row["path"]).convert("RGB")))
               for row in rows}
    assert len(wrapped) == len(rows) > 50
    assert {path: n for path, n in wrapped.items() if n} == {}


# ---- configs -------------------------------------------------------------------------------------

def test_dataset_tomls_parse_and_use_only_keys_kohya_accepts(packaged):
    store, _ = packaged
    root = store.stage_dir("package")
    for name, c in _characters(store).items():
        config = tomllib.loads((root / "configs" / f"{name}_dataset.toml").read_text())
        assert set(config) == {"general", "datasets"}
        assert set(config["general"]) <= GENERAL_KEYS
        assert config["general"]["caption_extension"] == ".txt" and config["general"]["keep_tokens"] == 1
        (dataset,) = config["datasets"]
        assert set(dataset) <= DATASET_KEYS and dataset["resolution"] == 512
        (subset,) = dataset["subsets"]
        assert set(subset) <= SUBSET_KEYS
        assert {"image_dir", "num_repeats", "class_tokens", "caption_extension", "keep_tokens", "shuffle_caption"} <= set(subset)
        assert subset["alpha_mask"] is True  # the images carry the character mask: kohya trains them masked
        assert subset["num_repeats"] == c["repeats"] and subset["class_tokens"] == c["trigger"]
        assert store.root / subset["image_dir"] == root / f"{c['repeats']}_{name}"  # relative to the run folder


def test_training_tomls_parse_and_use_only_train_network_options(packaged):
    store, _ = packaged
    root = store.stage_dir("package")
    for name, c in _characters(store).items():
        sections = tomllib.loads((root / "configs" / f"{name}_config.toml").read_text())
        flat = {k: v for table in sections.values() for k, v in table.items()}  # kohya merges sections
        assert len(flat) == sum(len(t) for t in sections.values())
        assert set(flat) <= TRAIN_NETWORK_KEYS
        assert {"pretrained_model_name_or_path", "dataset_config", "output_dir", "output_name", "network_module",
                "network_dim", "network_alpha", "unet_lr", "text_encoder_lr", "optimizer_type", "lr_scheduler",
                "max_train_epochs", "save_every_n_epochs", "mixed_precision", "cache_latents", "min_snr_gamma",
                "noise_offset", "caption_dropout_rate", "sample_prompts"} <= set(flat)
        assert store.root / flat["dataset_config"] == root / "configs" / f"{name}_dataset.toml"  # relative to the run
        assert (flat["network_dim"], flat["network_alpha"], flat["max_train_epochs"]) == (c["network_dim"], c["network_alpha"], c["epochs"])
        assert flat["unet_lr"] == c["unet_lr"] and flat["text_encoder_lr"] == c["text_encoder_lr"]
        prompts = (root / "configs" / f"{name}_prompts.txt").read_text().splitlines()
        assert prompts and all(p.startswith(c["trigger"] + ", ") and " --w 512 --h 512 " in p for p in prompts)


HAND_WRITTEN_DATASET = """[general]
caption_extension = ".txt"
shuffle_caption = true
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 1
enable_bucket = true
min_bucket_reso = 256
max_bucket_reso = 1024

  [[datasets.subsets]]
  image_dir = "package/30_hero"
  num_repeats = 30
  class_tokens = "hero_tok"
  caption_extension = ".txt"
  keep_tokens = 1
  shuffle_caption = true
  alpha_mask = true

  [[datasets.subsets]]
  image_dir = "package/10_bg"
  num_repeats = 10
  class_tokens = "bg \\"x\\" é"
  caption_extension = ".txt"
  keep_tokens = 1
  shuffle_caption = true
"""
HAND_WRITTEN_TRAINING = """[model]
pretrained_model_name_or_path = "stable-diffusion-v1-5/stable-diffusion-v1-5"
v_parameterization = true
zero_terminal_snr = true

[dataset]
dataset_config = "package/configs/hero_dataset.toml"
cache_latents = true
caption_dropout_rate = 0.05
max_data_loader_n_workers = 2

[network]
network_module = "networks.lora"
network_dim = 48
network_alpha = 24

[optimizer]
optimizer_type = "AdamW8bit"
unet_lr = 0.00011
text_encoder_lr = 5.5e-05
lr_scheduler = "cosine"

[training]
max_train_epochs = 20
mixed_precision = "fp16"
gradient_checkpointing = true
min_snr_gamma = 5.0
noise_offset = 0.05
seed = 0

[saving]
output_dir = "train/hero"
output_name = "hero"
save_model_as = "safetensors"
save_precision = "fp16"
save_every_n_epochs = 2
logging_dir = "train/hero/logs"

[sampling]
sample_prompts = "package/configs/hero_prompts.txt"
sample_every_n_epochs = 2
sample_sampler = "euler_a"
"""
"""What the package's hand-written TOML writer wrote for the configs of `test_tomls_load_as_the_hand_written_ones`."""


def test_tomls_load_as_the_hand_written_ones():
    """The configs written with tomli-w load (tomllib) to the same tables, keys in the same order, as the
    hand-written writer's did: subsets with and without alpha_mask, quotes and non-ASCII, floats, v-prediction."""
    params = PackageParams(v_parameterization=True)
    subsets = [kohya_subset(Path("package/30_hero"), 30, "hero_tok", params, masked=True),
               kohya_subset(Path("package/10_bg"), 10, 'bg "x" é', params)]
    plan = {"network_dim": 48, "network_alpha": 24, "unet_lr": 1.1e-4, "text_encoder_lr": 5.5e-5, "epochs": 20}
    training = kohya_training("hero", plan, Path("package/configs/hero_dataset.toml"),
                              Path("package/configs/hero_prompts.txt"), Path("train/hero"), params)
    for written, before in ((kohya_dataset(subsets, params), HAND_WRITTEN_DATASET), (training, HAND_WRITTEN_TRAINING)):
        loaded, expected = tomllib.loads(written), tomllib.loads(before)
        assert loaded == expected
        assert json.dumps(loaded) == json.dumps(expected)  # the same key order too
    assert tomllib.loads(HAND_WRITTEN_DATASET)["datasets"][0]["subsets"][1]["class_tokens"] == 'bg "x" é'


def test_ai_toolkit_yaml(packaged):
    store, _ = packaged
    root = store.stage_dir("package")
    job = yaml.safe_load((root / "configs" / "hero_ai_toolkit.yaml").read_text())
    assert job["job"] == "extension"
    (process,) = job["config"]["process"]
    assert process["type"] == "sd_trainer" and process["model"]["is_flux"] is True
    assert process["network"] == {"type": "lora", "linear": 16, "linear_alpha": 16}
    assert process["train"]["steps"] == 3000 and process["train"]["lr"] == 1e-4
    (dataset,) = process["datasets"]
    assert dataset["alpha_mask"] is True  # AI-Toolkit's option: the alpha channel is the loss mask
    assert dataset["caption_ext"] == "txt" and root / f"{_characters(store)['hero']['repeats']}_hero" == \
        store.root / dataset["folder_path"]  # relative to the run folder
    assert all(p.startswith("hero_tok, ") for p in process["sample"]["prompts"])


# ---- options, parameters, caching -----------------------------------------------------------------

def test_multi_concept_and_background_dataset(tmp_path):
    store = make_run(tmp_path, {"hero": ("human", 2), "blob": ("creature", 2)}, backgrounds=4)
    params = PackageParams(multi_concept=True, background=BackgroundDatasetParams(enabled=True, max_images=2))
    result = run_plain(store, "package", after="select", package=params)
    root = store.stage_dir("package")
    config = tomllib.loads((root / "configs" / "all_characters_dataset.toml").read_text())
    subsets = config["datasets"][0]["subsets"]
    assert sorted(s["class_tokens"] for s in subsets) == ["blob_tok", "hero_tok"]
    assert all(set(s) <= SUBSET_KEYS and s["alpha_mask"] is True for s in subsets)
    assert result.summary["multi_concept"] == "all_characters"
    (plain,) = tomllib.loads((root / "configs" / "background_dataset.toml").read_text())["datasets"][0]["subsets"]
    assert "alpha_mask" not in plain  # backgrounds are plain RGB pictures: nothing to mask
    assert all(Image.open(p).mode == "RGB" for p in (root / "10_background").glob("*.png"))
    background = _characters(store)["background"]
    assert background["kind"] == "background" and background["n_train"] == 2 and background["repeats"] == 10
    pairs = sorted((root / "10_background").glob("*.txt"))
    assert len(pairs) == 2 and all(p.read_text().startswith("bgscene, scenery") for p in pairs)
    run_plain(store, "package", after="caption", package=PackageParams())  # a new package replaces the old tree wholesale
    assert not (root / "10_background").exists() and not (root / "configs" / "all_characters_dataset.toml").exists()


def test_near_duplicate_backgrounds_are_dropped_and_the_count_capped():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    b = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    a2 = np.clip(a.astype(int) + 3, 0, 255).astype(np.uint8)  # a, slightly brighter
    c = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    emb = np.stack([thumbnail_embedding(x) for x in (a, b, a2, c)])
    assert pick_backgrounds(emb, 0.95, 10) == [0, 1, 3]
    assert len(pick_backgrounds(emb, 0.95, 2)) == 2


def test_unchanged_inputs_are_not_packaged_again(packaged):
    store, _ = packaged
    again = run_plain(store, "package", after="caption", package=PackageParams())
    assert again.recomputed is False


def test_parameters_are_checked_with_the_field_named():
    with pytest.raises(ValidationError, match="validation_split"):
        PackageParams(validation_split=1.0)
    with pytest.raises(ValidationError, match="background_color"):
        PackageParams(render={"background_color": "not-a-colour"})
    with pytest.raises(ValidationError, match="max_bucket_reso"):
        PackageParams(min_bucket_reso=512, max_bucket_reso=256)
    with pytest.raises(ValidationError, match="mixed_precision"):
        PackageParams(mixed_precision="fp8")


def test_a_character_that_vanishes_into_the_plain_background_is_quarantined(tmp_path):
    from tasks.validate import ValidateParams

    store = make_run(tmp_path, {"hero": ("human", 3)})
    cloud = store.read_manifest("select").to_pylist()[0]["path"]
    layer = np.zeros((60, 90, 4), np.uint8)
    yy, xx = np.mgrid[:60, :90]
    inside = ((yy - 30) / 26) ** 2 + ((xx - 45) / 40) ** 2 < 1
    layer[inside] = (252, 252, 252, 200)  # a pale cloud the segmenter took for a character
    Image.fromarray(layer, "RGBA").save(store.root / cloud)
    result = run_plain(store, "package", after="select", package=PackageParams())
    rows = store.read_manifest("package").to_pylist()
    (dropped,) = [r for r in rows if not r["kept"]]
    assert dropped["drop_reason"].startswith(f"quarantine: {cloud}: rendered image is uniform")
    assert result.summary["quarantined"] == 1 and result.summary["kept"] == 2
    assert run_plain(store, "validate", after="package", validate=ValidateParams()).summary["passed"]


# ---- masks (masked loss) ---------------------------------------------------------------------------

def test_packaged_alpha_is_the_characters_mask_dilated_and_feathered(packaged):
    """Every packaged image's alpha covers its character's alpha, grows a few pixels past it with a
    soft edge, and is 0 far from it; the RGB is the whole rendered picture (background included)."""
    from tasks.composite import read_row_images, render

    store, _ = packaged
    caption = {r["item_id"]: r for r in store.read_manifest("caption").to_pylist()}
    kept = [r for r in store.read_manifest("package").to_pylist() if r["kept"]]
    swapped = [r for r in kept if caption[r["item_id"]]["background_path"]]  # augmented onto a new background
    plain = [r for r in kept if not caption[r["item_id"]]["background_path"]]
    assert swapped and plain
    for row in swapped[:6] + plain[:6]:
        packaged_image = np.asarray(Image.open(store.root / row["path"]))
        layer, background = read_row_images(store.root, caption[row["item_id"]])
        rendered = render(layer, background, PackageParams().render)
        assert (packaged_image[..., :3] == rendered[..., :3]).all()
        alpha, character = packaged_image[..., 3].astype(int), rendered[..., 3].astype(int)
        assert (alpha >= character).all()
        grown = (alpha > 0) & (character == 0)
        assert grown.any() and ((alpha > 0) & (alpha < 255)).any()  # dilated, feathered
        assert (alpha == 0).mean() > 0.2  # the background stays out


def test_alpha_mask_off_packages_plain_rgb(tmp_path):
    store = make_run(tmp_path, {"hero": ("human", 2)})
    run_plain(store, "package", after="select", package=PackageParams(alpha_mask=False))
    root = store.stage_dir("package")
    (subset,) = tomllib.loads((root / "configs" / "hero_dataset.toml").read_text())["datasets"][0]["subsets"]
    assert "alpha_mask" not in subset
    assert all(Image.open(p).mode == "RGB" for p in root.rglob("*.png"))
    assert "alpha_mask" not in yaml.safe_load((root / "configs" / "hero_ai_toolkit.yaml").read_text())[
        "config"]["process"][0]["datasets"][0]
    with pytest.raises(ValidationError, match="mask_dilate"):
        PackageParams(mask_dilate=-1)


def test_validate_accepts_the_masked_rgba_images(packaged):
    from tasks.validate import ValidateParams, validate_dataset

    store, _ = packaged
    report = validate_dataset(store.stage_dir("package"), ValidateParams())
    assert "not_rgb" not in report["warnings"], report["warnings"]
