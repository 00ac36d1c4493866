"""Split-file parsing and validation, class names, the dataset registry on real split files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from ltclip.data.manifests import (
    align_classnames,
    check_train_covers_classes,
    classnames_from_folders,
    manifest_from_inat_json,
    read_classnames,
    read_manifest,
)


def names(path):
    return [name for _, name in read_classnames(path)]
from ltclip.data.registry import list_datasets, load_dataset
from ltclip.errors import LtclipError


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_places_lt_train_profile(shared_manifests):
    split = read_manifest(shared_manifests / "Places_LT_train.txt", "train", 365)
    counts = split.class_counts(365)
    assert len(split) == 62_500
    assert counts.max() == 4980 and counts.min() == 5
    # independent count: a plain loop over the file
    loop = [0] * 365
    for line in open(shared_manifests / "Places_LT_train.txt"):
        loop[int(line.split()[-1])] += 1
    assert counts.tolist() == loop


def test_real_split_hashes_match_published(shared_manifests):
    split = read_manifest(shared_manifests / "Places_LT_val.txt", "val", 365)
    assert split.sha256 == "719e3cf3766c09134ea28f56f1036c78def511ac1ed2c2532a6beef78f2439ba"


@pytest.mark.parametrize(
    "text, problem",
    [
        ("a.jpg 0\nb.jpg\n", "malformed line"),
        ("a.jpg 0\nb.jpg x\n", "not an integer"),
        ("a.jpg 0\nb.jpg -1\n", "negative label"),
        ("a.jpg 0\nb.jpg 3\n", ">= number of classes 3"),
        ("a.jpg 0\na.jpg 1\n", "duplicate path"),
        ("\n\n", "empty"),
    ],
)
def test_bad_manifest_lines_name_file_and_line(tmp_path, text, problem):
    path = write(tmp_path, "split.txt", text)
    with pytest.raises(LtclipError) as err:
        read_manifest(path, "train", 3)
    message = str(err.value)
    assert problem in message and str(path) in message and "\n" not in message
    if problem != "empty":
        assert f"{path}:2:" in message


def test_missing_manifest(tmp_path):
    with pytest.raises(LtclipError, match="split file not found"):
        read_manifest(tmp_path / "nope.txt", "train")


def test_paths_with_spaces_keep_their_spaces(tmp_path):
    split = read_manifest(write(tmp_path, "s.txt", "my dir/a b.jpg 1\n"), "train", 2)
    assert split.keys == ["my dir/a b.jpg"] and split.labels.tolist() == [1]


def test_classes_absent_from_train(tmp_path):
    split = read_manifest(write(tmp_path, "s.txt", "a 0\nb 2\n"), "train", 3)
    with pytest.raises(LtclipError, match="1 of 3 classes have no training image"):
        check_train_covers_classes(split, 3)


def test_classname_formats(tmp_path, shared_manifests):
    assert names(shared_manifests / "ImageNet_LT_classnames.txt")[:2] == ["tench", "goldfish"]
    places = names(shared_manifests / "Places_LT_classnames.txt")
    assert len(places) == 365 and places[2] == "airport terminal"
    inat = names(shared_manifests / "iNaturalist18_categories.json")
    assert len(inat) == 8142 and inat[0] == "Hermodice carunculata"
    assert names(write(tmp_path, "n.txt", "/a/abbey\nred_triangle\n")) == ["abbey", "red triangle"]


def test_places_class_file_is_aligned_to_labels_by_folder(shared_manifests):
    """The published class file's line order differs from the labels for 5 classes."""
    split = read_manifest(shared_manifests / "Places_LT_train.txt", "train", 365)
    pairs = read_classnames(shared_manifests / "Places_LT_classnames.txt")
    from_folders = classnames_from_folders(split, 365)
    assert sum(a != b for a, b in zip(from_folders, [n for _, n in pairs])) == 5
    aligned = align_classnames(pairs, split, "Places_LT_classnames.txt")
    assert aligned == from_folders
    assert aligned[116] == "desert road" and split.keys[split.labels.tolist().index(116)].startswith("train/desert_road/")


def test_class_file_without_folder_keys_keeps_line_order(tmp_path):
    split = read_manifest(write(tmp_path, "s.txt", "x/a.jpg 1\nx/b.jpg 0\n"), "train", 2)
    assert align_classnames([("cat", "cat"), ("dog", "dog")], split, "n") == ["cat", "dog"]


def test_inat_split_from_official_json(tmp_path):
    data = {
        "images": [{"id": 10, "file_name": "train_val2018/a/1.jpg"}, {"id": 11, "file_name": "train_val2018/b/2.jpg"}],
        "annotations": [{"image_id": 11, "category_id": 0}, {"image_id": 10, "category_id": 1}],
    }
    split = manifest_from_inat_json(write(tmp_path, "val2018.json", json.dumps(data)), "val")
    assert split.keys == ["train_val2018/a/1.jpg", "train_val2018/b/2.jpg"]
    assert split.labels.tolist() == [1, 0]
    with pytest.raises(LtclipError, match="not an iNaturalist annotation JSON"):
        manifest_from_inat_json(write(tmp_path, "bad.json", "{}"), "val")


def test_registry_lists_every_spec():
    names = {s.name for s in list_datasets()}
    assert {"imagenet_lt", "places_lt", "inat18", "cifar100_lt", "synthetic"} <= names


def test_load_places_lt_from_real_split_files(shared_manifests, tmp_path):
    ds = load_dataset("places_lt", tmp_path, manifest_dir=shared_manifests)
    assert ds.num_classes == 365 and set(ds.splits) == {"train", "val", "test"}
    assert len(ds.split("test")) == 36_500
    assert ds.classnames[0] == "airfield"
    assert len(ds.prompt_templates()) == 80  # OpenAI's ImageNet templates


def test_load_inat18_val_as_test(shared_manifests, tmp_path):
    # a stand-in train list that covers every class once, beside the real val list
    (tmp_path / "iNaturalist18_train.txt").write_text("".join(f"t/{i}.jpg {i}\n" for i in range(8142)))
    ds = load_dataset("inat18", tmp_path, manifest_dir=shared_manifests, classnames_file=str(shared_manifests / "iNaturalist18_categories.json"))
    assert len(ds.split("val")) == 24_426 and ds.split("test").keys == ds.split("val").keys


def test_custom_dataset_and_its_errors(tmp_path):
    write(tmp_path, "train.txt", "a.png 0\nb.png 1\n")
    write(tmp_path, "test.txt", "c.png 1\n")
    write(tmp_path, "names.txt", "cat\ndog\n")
    ds = load_dataset("custom", tmp_path, split_files={"train": "train.txt", "test": "test.txt"}, classnames_file=str(tmp_path / "names.txt"))
    assert ds.classnames == ["cat", "dog"] and ds.num_classes == 2
    np.testing.assert_array_equal(ds.train_counts(), [1, 1])
    with pytest.raises(LtclipError, match="needs --train-list"):
        load_dataset("custom", tmp_path)
    with pytest.raises(LtclipError, match="unknown dataset 'imagenet'"):
        load_dataset("imagenet", tmp_path)
    write(tmp_path, "names3.txt", "cat\ndog\nbird\n")
    with pytest.raises(LtclipError, match="have no training image"):
        load_dataset("custom", tmp_path, split_files={"train": "train.txt"}, classnames_file=str(tmp_path / "names3.txt"))


def test_synthetic_through_the_registry(synthetic_root):
    ds = load_dataset("synthetic", synthetic_root)
    counts = ds.train_counts()
    assert ds.num_classes == 10 and counts[0] == 40 and counts[-1] == 2
    image = ds.open_image("test", 0)
    assert image.mode == "RGB" and image.size == (32, 32)


def test_template_sets_and_files(tmp_path):
    from ltclip.data.templates import resolve_templates

    assert len(resolve_templates("openai_imagenet")) == 80
    assert all(t.count("{}") == 1 for t in resolve_templates("openai_imagenet"))
    path = write(tmp_path, "t.txt", "a photo of a {}.\n\nart of the {}\n")
    assert resolve_templates(str(path)) == ["a photo of a {}.", "art of the {}"]
    with pytest.raises(LtclipError, match="exactly one"):
        resolve_templates(str(write(tmp_path, "bad.txt", "no slot here\n")))
    with pytest.raises(LtclipError, match="neither a template file nor one of"):
        resolve_templates("openai")
