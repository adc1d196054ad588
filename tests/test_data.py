"""Datasets with ImageNet labels: synset folders, labels.csv, and clear errors."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from conftest import shared_data_dir
from pruning.data import eval_transform, image_dataset, imagenet_synsets, random_indices, subset, take_images
from pruning.errors import UserInputError
from pruning.models import create_model


def _write_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (40, 30), 128).save(path)  # grayscale on purpose: loaders must convert to RGB


def test_synset_folders_get_imagenet_indices(tmp_path):
    _write_image(tmp_path / "n02102040" / "a.JPEG")
    _write_image(tmp_path / "n01440764" / "b.jpg")
    ds = image_dataset(str(tmp_path))
    assert sorted(label for _, label in ds.samples) == [0, 217]
    img, _ = ds[0]
    assert img.mode == "RGB"


def test_labels_csv(tmp_path):
    _write_image(tmp_path / "images" / "x.JPEG")
    (tmp_path / "labels.csv").write_text("file,label_index,synset\nimages/x.JPEG,472,n02951358\n")
    ds = image_dataset(str(tmp_path), eval_transform(create_model("efficientnet_b0"), 32))
    x, y = ds[0]
    assert tuple(x.shape) == (3, 32, 32) and y == 472


@pytest.mark.parametrize("make,needle", [
    (lambda p: p / "missing", "does not exist"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "holds no images"),
    (lambda p: (p / "cats" / "x").mkdir(parents=True) or p / "cats", "not ImageNet-1k synsets"),
])
def test_bad_data_roots(tmp_path, make, needle):
    with pytest.raises((ValueError, FileNotFoundError), match=needle):
        image_dataset(str(make(tmp_path)))


def test_an_empty_class_folder_is_refused(tmp_path):
    _write_image(tmp_path / "n01440764" / "a.jpg")
    (tmp_path / "n02102040").mkdir()
    (tmp_path / "n02102040" / "notes.txt").write_text("no image here")
    with pytest.raises(UserInputError, match=r"1 empty class folders .*\['n02102040'\].*delete the empty folders"):
        image_dataset(str(tmp_path))


@pytest.mark.parametrize("text,needle", [
    ("file,label\nimages/x.JPEG,3\n", r"needs the columns 'file' and 'label_index'.*has \['file', 'label'\]"),
    ("", r"needs the columns 'file' and 'label_index'.*has \[\]"),
    ("file,label_index\nimages/x.JPEG\n", r"line 2: label_index None is not an ImageNet-1k index"),
    ("file,label_index\nimages/x.JPEG,\n", r"line 2: label_index '' is not an ImageNet-1k index"),
    ("file,label_index\nimages/x.JPEG,3\n,4\n", r"line 3: no file name in column 'file'"),
    ("file,label_index\nimages/x.JPEG,1000\n", r"line 2: label_index '1000' is not an ImageNet-1k index 0\.\.999 or -1"),
    ("file,label_index\nimages/x.JPEG,3\nimages/gone.jpg,4\n", r"lists 1 files that do not exist.*gone\.jpg"),
])
def test_bad_labels_csv_names_the_problem(tmp_path, text, needle):
    _write_image(tmp_path / "images" / "x.JPEG")
    (tmp_path / "labels.csv").write_text(text)
    with pytest.raises(UserInputError, match=needle):
        image_dataset(str(tmp_path))


def test_an_image_that_breaks_later_is_replaced_by_the_next(tmp_path, caplog):
    """A file that became undecodable after the preflight scan: the next readable sample, every time, logged once."""
    for i, synset in enumerate(["n01440764", "n02102040", "n02979186"]):
        _write_image(tmp_path / synset / f"{i}.jpg")
    ds = image_dataset(str(tmp_path))
    bad = tmp_path / "n02102040" / "1.jpg"
    bad.write_bytes(bad.read_bytes()[:50])
    with caplog.at_level("WARNING", logger="pruning"):
        labels = [ds[1][1], ds[1][1], ds[0][1]]
    assert labels == [482, 482, 0]  # sample 2 stands in for sample 1
    assert sum(str(bad) in r.getMessage() for r in caplog.records) == 1 and ds.replaced == {str(bad)}
    for synset in ("n01440764", "n02979186"):
        for f in (tmp_path / synset).iterdir():
            f.write_bytes(b"")
    with pytest.raises(UserInputError, match="cannot be decoded"):
        ds[0]


def test_subset_is_deterministic(tmp_path):
    for i in range(10):
        _write_image(tmp_path / "n01440764" / f"{i}.jpg")
    ds = image_dataset(str(tmp_path))
    assert subset(ds, 4, seed=1).samples == subset(ds, 4, seed=1).samples
    assert len(subset(ds, 4).samples) == 4 and subset(ds, None) is ds


def test_random_indices_are_a_seeded_draw_in_order():
    drawn = random_indices(10, 4, seed=1)
    assert drawn == sorted(drawn) == random_indices(10, 4, seed=1) and len(set(drawn)) == 4
    assert random_indices(10, 20, seed=0) == list(range(10))


def test_take_images_stops_at_the_count_without_drawing_more():
    drawn = []

    def batches():
        for i in range(10):
            drawn.append(i)
            yield torch.full((4, 1), i), torch.full((4,), i)

    taken = list(take_images(batches(), 10, "test", progress=False))
    assert [len(x) for x, _ in taken] == [len(y) for _, y in taken] == [4, 4, 2] and drawn == [0, 1, 2]


def test_shared_data_labels():
    root = shared_data_dir()
    if not (root / "imagenette2-224").is_dir():
        pytest.skip(f"shared data not found at {root}")
    train = image_dataset(str(root / "imagenette2-224" / "train"))
    assert len(train) == 5000 and {label for _, label in train.samples} == {0, 217, 482, 491, 497, 566, 569, 571, 574, 701}
    val = image_dataset(str(root / "imagenet-val-1300"))
    assert len(val) == 1300
    synsets = imagenet_synsets()
    assert synsets[65] == "n01751748"


@pytest.mark.parametrize("seed", [None, 3])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_partition_the_dataset_without_repeats(world, seed):
    """Every image on exactly one rank (DistributedSampler would pad 10 images to 12 over 3 ranks)."""
    from pruning.data import ShardSampler

    shards = [list(ShardSampler(10, world, r, seed)) for r in range(world)]
    assert sorted(i for s in shards for i in s) == list(range(10))
    first = [s[0] for s in shards]
    assert (first == list(range(world))) == (seed is None)  # seeded order is a permutation, not the identity
    assert shards == [list(ShardSampler(10, world, r, seed)) for r in range(world)]  # deterministic
    if seed is not None:  # the order RandomSampler gave before sharding existed: cached scores stay valid
        import torch
        from torch.utils.data import RandomSampler

        order = list(RandomSampler(range(10), generator=torch.Generator().manual_seed(seed)))
        assert [i for r in range(10) for s in shards for i in s[r:r + 1]] == order


@pytest.mark.parametrize("shard,expected", [(False, list(range(10))), (True, [1, 3, 5, 7, 9])])
def test_eval_loader_shards_only_when_asked(monkeypatch, shard, expected):
    """Rank 1 of 2: a loader asked to shard sees its share (the caller reduces), any other sees everything."""
    import pruning.distributed as D
    from pruning.data import eval_loader

    monkeypatch.setattr(D, "world_size", lambda: 2)
    monkeypatch.setattr(D, "rank", lambda: 1)
    data = torch.utils.data.TensorDataset(torch.arange(10))
    seen = [int(i) for (batch,) in eval_loader(data, batch_size=4, workers=0, shard=shard) for i in batch]
    assert seen == expected
