"""Training pools: several folders, labels -1, balanced sampling, and copies of validation images taken out."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_data_dir
from distill.data import ResumableSampler
from pruning.data import image_dataset
from pruning.pools import check_balance, find_copies, sampling_weights, training_pool


def _photo(seed: int, size=(300, 200)) -> Image.Image:
    """A smooth random 'photo' (low-frequency content survives resizing, as in real photos)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (6, 9, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.BICUBIC)


def _csv_folder(root, labels: list[int], seeds: list[int], size=(300, 200)):
    (root / "images").mkdir(parents=True)
    rows = ["file,label_index"]
    for i, (label, seed) in enumerate(zip(labels, seeds)):
        _photo(seed, size).save(root / "images" / f"{i}.jpg", quality=90)
        rows.append(f"images/{i}.jpg,{label}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root


def test_copies_are_found_whatever_the_name_size_or_encoding(tmp_path):
    """A val photo squashed to 227x227 and its pool copy resized with the aspect kept and re-encoded: found."""
    val = _csv_folder(tmp_path / "val", [1, 2, 3], [10, 11, 12], size=(227, 227))
    pool = _csv_folder(tmp_path / "pool", [5, 6, -1, 7], [20, 11, 21, 12], size=(336, 224))
    result = training_pool([str(pool)], image_dataset(str(val)))
    dropped = sorted(p.rsplit("/", 1)[-1] for p, _ in result.excluded)
    assert dropped == ["1.jpg", "3.jpg"]  # seeds 11 and 12 are the val photos 1.jpg and 2.jpg
    assert sorted(v.rsplit("/", 1)[-1] for _, v in result.excluded) == ["1.jpg", "2.jpg"]
    assert [label for _, label in result.dataset.samples] == [5, -1]
    assert result.summary()["excluded_val_copies"] == 2 and result.summary()["labelled"] == 1


def test_no_copies_no_exclusion_and_thumbnails_are_cached(tmp_path):
    val = _csv_folder(tmp_path / "val", [1], [1])
    pool = _csv_folder(tmp_path / "pool", [2, 3], [2, 3])
    cache = tmp_path / "cache"
    assert find_copies([str(pool / "images" / "0.jpg")], [str(val / "images" / "0.jpg")], str(cache)) == []
    assert len(list((cache / "thumbnails").iterdir())) == 2
    assert len(training_pool([str(pool)], image_dataset(str(val)), str(cache)).dataset) == 2


def test_the_nine_known_val_images_are_excluded_from_imagenette():
    root = shared_data_dir()
    if not (root / "imagenette2-224").is_dir():
        pytest.skip(f"shared data not found at {root}")
    val_names = {r["file"].rsplit("/", 1)[-1] for r in csv.DictReader(open(root / "imagenet-val-1300" / "labels.csv"))}
    known = {r["file"] for r in csv.DictReader(open(root / "imagenette2-224" / "index.csv"))
             if r["split"] == "train" and r["file"].rsplit("/", 1)[-1] in val_names}
    assert len(known) == 9
    pool = training_pool([str(root / "imagenette2-224" / "train")], image_dataset(str(root / "imagenet-val-1300")))
    excluded = {p.split("imagenette2-224/", 1)[1] for p, _ in pool.excluded}
    assert excluded == known  # by content: every known copy, nothing else
    assert all(p.rsplit("/", 1)[-1] == v.rsplit("/", 1)[-1] for p, v in pool.excluded)  # each with its own original
    assert len(pool.dataset) == 5000 - 9


def test_several_roots_and_teacher_only_labels(tmp_path):
    a = _csv_folder(tmp_path / "a", [3, 4], [1, 2])
    b = _csv_folder(tmp_path / "b", [-1, -1, 4], [3, 4, 5])
    pool = training_pool([str(a), str(b)])
    assert pool.sources == [0, 0, 1, 1, 1] and pool.labels() == [3, 4, -1, -1, 4]
    assert pool.summary()["classes"] == 2 and pool.summary()["roots"][1]["images"] == 3


def _break(path, how: str) -> None:
    """Make the image at ``path`` undecodable: cut off half of it, or replace it with bytes that are no image."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if how == "truncate" else b"not an image" * 10)


def test_undecodable_images_are_left_out_listed_and_cached(tmp_path):
    """A truncated JPEG in the pool and a garbage file in the val set: dropped and listed by the scan (with or
    without a val set), never a copy of anything, and the cached scan (and a corrupt cache file) agree."""
    from pruning.pools import _thumbnail_cache, readable_images, thumbnails

    val = _csv_folder(tmp_path / "val", [1, 2], [1, 2])
    pool = _csv_folder(tmp_path / "pool", [3, 4, 5], [3, 4, 5])
    _break(pool / "images" / "1.jpg", "truncate")
    _break(val / "images" / "0.jpg", "garbage")
    cache = str(tmp_path / "cache")
    val_set, bad_val = readable_images(image_dataset(str(val)), cache, progress=False)
    assert bad_val == [str(val / "images" / "0.jpg")] and [label for _, label in val_set.samples] == [2]
    for exclude in (val_set, None):
        result = training_pool([str(pool)], exclude, cache, progress=False, scan=True)
        assert result.unreadable == [str(pool / "images" / "1.jpg")] and result.labels() == [3, 5]
        assert result.excluded == [] and result.summary()["unreadable_images"] == 1
    assert training_pool([str(pool)]).unreadable == []  # no scan asked for: the images are not even opened
    paths = [p for p, _ in image_dataset(str(pool)).samples]
    cached = Path(_thumbnail_cache(paths, cache))
    cached.write_bytes(cached.read_bytes()[:40])  # a truncated cache file is recomputed and rewritten
    assert thumbnails(paths, cache, progress=False)[1] == [1]
    assert np.load(cached)["unreadable"].tolist() == [1]


@pytest.mark.parametrize("bad", ["1000", "-2", "cat"])
def test_labels_outside_imagenet_are_refused(tmp_path, bad):
    root = _csv_folder(tmp_path / "a", [1], [1])
    (root / "labels.csv").write_text(f"file,label_index\nimages/0.jpg,{bad}\n")
    with pytest.raises(ValueError, match=r"line 2: label_index .* 0\.\.999 or -1"):
        image_dataset(str(root))


def test_balanced_weights(tmp_path):
    a = _csv_folder(tmp_path / "a", [3, 3, 3, 4], [1, 2, 3, 4])
    b = _csv_folder(tmp_path / "b", [-1, -1], [5, 6])
    pool = training_pool([str(a), str(b)])
    by_class = sampling_weights(pool, "class")
    assert by_class[:3].sum() == pytest.approx(by_class[3]) == pytest.approx(by_class[4]) == pytest.approx(by_class[5])
    by_source = sampling_weights(pool, "source")
    assert by_source[:4].sum() == pytest.approx(by_source[4:].sum())
    assert sampling_weights(pool, None) is None
    with pytest.raises(ValueError, match="data.balance='classes' is not one of"):
        check_balance("classes")


def test_weighted_sampler_draws_in_proportion_and_resumes_exactly():
    weights = torch.tensor([1.0] * 90 + [9.0] * 10, dtype=torch.float64)  # the last 10 images: half the mass
    data = list(range(100))
    sampler = ResumableSampler(data, num_replicas=1, rank=0, seed=3, batch_size=10, weights=weights)
    draws = []
    for epoch in range(20):
        sampler.set_position(epoch, 0)
        draws += list(sampler)
    share = sum(d >= 90 for d in draws) / len(draws)
    assert 0.45 < share < 0.55 and len(draws) == 2000
    sampler.set_position(5, 0)
    whole = list(sampler)
    sampler.set_position(5, 3)
    assert list(sampler) == whole[30:]  # a resumed epoch replays the same draws
    shards = []
    for rank in range(2):
        s = ResumableSampler(data, num_replicas=2, rank=rank, seed=3, batch_size=10, weights=weights)
        s.set_position(5, 0)
        shards.append(list(s))
    assert Counter(shards[0] + shards[1]) == Counter(whole)  # ranks split one list of draws


def test_pipeline_pools_exclusion_label_free_and_honest_validation(tmp_path):
    """The app end to end on two pools (one holding a copy of a val image and unlabelled images), validated on
    a 3-class val folder: the copy is dropped and counted, CE defaults to 0, and the report warns about the
    3 classes."""
    from hydra import compose, initialize_config_dir

    from pruning.loggers import NullLogger
    from pruning.pipeline import preflight, run_stages
    from test_run import CONF

    val = _csv_folder(tmp_path / "val", [1, 2, 3], [100, 101, 102], size=(227, 227))
    a = _csv_folder(tmp_path / "a", [1, 2, 3, 4] * 3, list(range(12)))
    b = _csv_folder(tmp_path / "b", [-1] * 5 + [5], list(range(20, 25)) + [101], size=(300, 224))  # 5.jpg: a copy
    overrides = ["model.name=resnet18", "model.img_size=32", "model.pretrained=false", "importance=taylor_weight",
                 "importance.num_images=8", "importance.batch_size=4", "budget.target=0.5", "logger=none",
                 f"data.train_roots=[{a},{b}]", f"data.val_root={val}", "data.balance=class", "data.workers=0",
                 "trainer.epochs=1", "trainer.batch_size=4", "trainer.amp=null", "trainer.channels_last=false",
                 "trainer.warmup_epochs=0", "trainer.cooldown_epochs=0", "data.val_batch_size=4",
                 "trainer.val_every_steps=2",
                 f"paths.cache_dir={tmp_path / 'cache'}"]
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    ctx = preflight(cfg, str(tmp_path / "run"), NullLogger())
    report = run_stages(ctx)
    pool = report["data"]["pool"]
    assert (pool["images"], pool["labelled"], pool["excluded_val_copies"]) == (17, 12, 1)
    assert pool["excluded"][0]["pool"].endswith("b/images/5.jpg") and report["data"]["ce_weight"] == 0.0
    assert report["validate"]["dataset"] == {"root": str(val), "images": 3, "classes": 3, "unreadable_images": 0,
                                             "unreadable": []}
    assert any("covers 3 of ImageNet's 1000 classes" in w for w in report["validate"]["warnings"])
    assert report["finetune"]["steps"] == 17 // 4 and report["finetune"]["resumed_from"] is None
    assert [step for step, _ in report["finetune"]["val_curve"]] == [2, 4]  # every 2 updates, and after the last
    assert (tmp_path / "run" / "learning_curve.png").is_file()


def test_validation_warnings():
    from distill.evaluate import validation_warnings

    assert validation_warnings(725, 40.0, 55.0) == []
    assert "covers 10 of ImageNet's 1000 classes" in validation_warnings(10, 40.0, 55.0)[0]
    lead = validation_warnings(725, 84.6, 50.4)
    assert len(lead) == 1 and "beats its teacher by 34.2" in lead[0]
