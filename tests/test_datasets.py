"""Tests of the data set readers on tiny generated sets and on the real shared data."""

import json
import logging

import numpy as np
import pytest
from PIL import Image

from featurecache.datasets import DatasetError, detect_layout, read_class_file, read_dataset

from conftest import make_voc, write_voc_xml

# --------------------------------------------------------------------------- VOC, generated


def test_voc_boxes_are_converted_from_1_based_inclusive(tiny_voc):
    ds = read_dataset(tiny_voc)
    assert ds.layout == "voc" and len(ds) == 3
    a = ds[0]
    assert a.relpath == "JPEGImages/a.jpg" and (a.width, a.height) == (64, 48)
    # VOC 1..32 inclusive covers 32 pixels: [0, 32) in pixel-edge coordinates.
    np.testing.assert_array_equal(a.boxes[0], [0, 0, 32, 48])
    assert a.classes == ("dog", "cat") and a.difficult.tolist() == [False, True]
    assert a.labels == {"dog"} and a.difficult_labels == {"cat"}
    assert set(a.splits) == {"train", "trainval"}


def test_voc_classes_sorted_and_stable_across_splits(tiny_voc):
    assert read_dataset(tiny_voc).classes == ("cat", "dog")
    val = read_dataset(tiny_voc, split="val")
    assert val.classes == ("cat", "dog")  # val has no cat, the list is the same
    assert [r.relpath for r in val] == ["JPEGImages/c.jpg"] and val.split == "val"


def test_zero_area_box_is_dropped_with_one_warning(tiny_voc, caplog):
    with caplog.at_level(logging.WARNING, logger="featurecache"):
        ds = read_dataset(tiny_voc)
    c = ds[2]
    assert len(c.boxes) == 1 and c.classes == ("dog",)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "dropped 1" in warnings[0].getMessage() and "c.xml" in warnings[0].getMessage()
    assert ds.box_problems == [(str(tiny_voc.resolve() / "Annotations" / "c.xml"),
                                "dropped dog box with zero area or inverted corners")]


def test_boxes_outside_the_image_are_clipped_or_dropped(tmp_path, caplog):
    root = make_voc(tmp_path / "v", {"x": [("dog", -5, 10, 30, 60), ("dog", 70, 70, 90, 90), ("cat", 30, 1, 20, 9)]})
    with caplog.at_level(logging.WARNING, logger="featurecache"):
        ds = read_dataset(root)
    np.testing.assert_array_equal(ds[0].boxes, [[0, 9, 30, 48]])  # 64x48 image
    assert "dropped 2" in caplog.text and "clipped 1" in caplog.text


def test_class_list_file_orders_classes_and_rejects_unknown(tiny_voc, tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("dog\ncat\n# a comment\nbird\n")
    names = read_class_file(f)
    assert names == ("dog", "cat", "bird")
    ds = read_dataset(tiny_voc, classes=names)
    assert ds.classes == names and ds.class_ids(ds[0]).tolist() == [0, 1]
    with pytest.raises(DatasetError, match=r"a\.xml: object of class 'cat' is not in the class list"):
        read_dataset(tiny_voc, classes=("dog",))


def test_missing_split_file_names_it_and_the_splits_there(tiny_voc):
    with pytest.raises(DatasetError, match=r"test\.txt: no such split file \(splits here: train, trainval, val\)"):
        read_dataset(tiny_voc, split="test")


def test_malformed_xml_names_the_file(tiny_voc):
    (tiny_voc / "Annotations" / "b.xml").write_text("<annotation><object>")
    with pytest.raises(DatasetError, match=r"b\.xml: malformed XML"):
        read_dataset(tiny_voc)


def test_bad_coordinate_names_the_file_and_tag(tiny_voc):
    write_voc_xml(tiny_voc / "Annotations" / "b.xml", "b.jpg", 64, 48, [("cat", "one", 1, 5, 5)])
    with pytest.raises(DatasetError, match=r"b\.xml: <xmin> is not a number: 'one'"):
        read_dataset(tiny_voc)


def test_missing_size_is_read_from_the_image(tiny_voc):
    xml = tiny_voc / "Annotations" / "b.xml"
    xml.write_text(xml.read_text().replace("<width>64</width>", "").replace("<height>48</height>", ""))
    assert (read_dataset(tiny_voc)[1].width, read_dataset(tiny_voc)[1].height) == (64, 48)


def test_devkit_folder_one_level_up_is_found(tiny_voc):
    assert detect_layout(tiny_voc.parent) == "voc"
    assert read_dataset(tiny_voc.parent).root == tiny_voc.resolve()


# --------------------------------------------------------------------------- other layouts


def _save(path, size=(20, 10), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size).save(path)


def test_coco_layout_with_iscrowd_as_difficult(tmp_path):
    _save(tmp_path / "img" / "p.jpg", (40, 30))
    _save(tmp_path / "img" / "q.png", (50, 20))
    ann = {
        "images": [{"id": 7, "file_name": "q.png", "width": 50, "height": 20},
                   {"id": 3, "file_name": "p.jpg", "width": 0, "height": 0}],
        "categories": [{"id": 1, "name": "zebra"}, {"id": 2, "name": "ant"}],
        "annotations": [{"image_id": 3, "category_id": 1, "bbox": [1.5, 2, 10, 20], "iscrowd": 0},
                        {"image_id": 3, "category_id": 2, "bbox": [0, 0, 5, 5], "iscrowd": 1},
                        {"image_id": 7, "category_id": 2, "bbox": [45, 0, 10, 10]}],
    }
    f = tmp_path / "instances.json"
    f.write_text(json.dumps(ann))
    ds = read_dataset(tmp_path / "img", annotations=f)
    assert ds.layout == "coco" and ds.classes == ("ant", "zebra")
    p, q = ds
    assert p.relpath == "p.jpg" and (p.width, p.height) == (40, 30)  # size read from the file
    np.testing.assert_allclose(p.boxes, [[1.5, 2, 11.5, 22], [0, 0, 5, 5]])
    assert p.difficult.tolist() == [False, True] and p.labels == {"zebra"}
    np.testing.assert_allclose(q.boxes, [[45, 0, 50, 10]])  # clipped


def test_coco_malformed_json_names_file(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text("{")
    with pytest.raises(DatasetError, match=r"bad\.json: malformed JSON"):
        read_dataset(tmp_path, annotations=f)
    f.write_text("[]")
    with pytest.raises(DatasetError, match=r"bad\.json: not a COCO instances file"):
        read_dataset(tmp_path, annotations=f)


def test_class_folders_layout(tmp_path):
    _save(tmp_path / "dogs" / "1.jpg", (30, 20))
    _save(tmp_path / "cats" / "2.png", (10, 40), mode="L")
    _save(tmp_path / "cats" / "3.JPG")
    (tmp_path / "empty").mkdir()
    ds = read_dataset(tmp_path)
    assert ds.layout == "folders" and ds.classes == ("cats", "dogs") and not ds.has_boxes
    assert [r.relpath for r in ds] == ["cats/2.png", "cats/3.JPG", "dogs/1.jpg"]
    np.testing.assert_array_equal(ds[0].boxes, [[0, 0, 10, 40]])  # the whole image
    assert ds[2].labels == {"dogs"}
    with pytest.raises(DatasetError, match=r"dogs: folder of class 'dogs' is not in the class list"):
        read_dataset(tmp_path, classes=("cats",))


def test_plain_folder_layout(tmp_path):
    _save(tmp_path / "b.png")
    _save(tmp_path / "a.jpg")
    (tmp_path / "notes.txt").write_text("not an image")
    ds = read_dataset(tmp_path)
    assert ds.layout == "plain" and [r.relpath for r in ds] == ["a.jpg", "b.png"]
    assert ds.classes == () and ds[0].labels == frozenset() and ds[0].boxes.shape == (0, 4)


def test_undetectable_layout_lists_what_was_tried(tmp_path):
    (tmp_path / "readme.txt").write_text("x")
    with pytest.raises(DatasetError) as e:
        read_dataset(tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path) in msg
    for word in ("voc", "coco", "folders", "plain", "--layout"):
        assert word in msg


def test_split_on_a_non_voc_layout_is_refused(tmp_path):
    _save(tmp_path / "a.jpg")
    with pytest.raises(DatasetError, match="--split needs a VOC layout"):
        read_dataset(tmp_path, split="train")


# --------------------------------------------------------------------------- real data


def test_real_voc_sample_counts(voc_sample):
    ds = read_dataset(voc_sample)
    assert len(ds) == 100 and ds.num_boxes == 273 and len(ds.classes) == 20
    assert sum(int(r.difficult.sum()) for r in ds) == 38
    person_images = sum("person" in r.labels for r in ds)
    assert person_images == 38  # the data README's per-class image count
    val = read_dataset(voc_sample, split="val")
    assert len(val) == 33 and val.classes == ds.classes
    assert all("val" in r.splits and "trainval" in r.splits for r in val)


def test_real_voc_sample_coco_json_gives_the_same_boxes(voc_sample):
    voc = read_dataset(voc_sample)
    coco = read_dataset(voc_sample / "JPEGImages",
                        annotations=voc_sample.parent / "coco_format_v1" / "instances_default.json")
    assert coco.classes == voc.classes and len(coco) == len(voc)
    by_name = {r.path.name: r for r in coco}
    for v in voc:
        c = by_name[v.path.name]
        assert (c.width, c.height) == (v.width, v.height)
        # This export wrote VOC's xmin/ymin unchanged as x, y and xmax - xmin as width: its
        # corners are VOC's numbers, i.e. ours shifted by one pixel at the top left.
        key = lambda b, n: (n, tuple(b))  # noqa: E731
        want = sorted(key(b + np.array([1, 1, 0, 0], np.float32), n) for b, n in zip(v.boxes, v.classes))
        got = sorted(key(b, n) for b, n in zip(c.boxes, c.classes))
        assert got == want, v.path.name


def test_real_bccd_trainval_survives_zero_area_boxes(bccd, caplog):
    with caplog.at_level(logging.WARNING, logger="featurecache"):
        ds = read_dataset(bccd, split="trainval")
    assert len(ds) == 292 and ds.classes == ("Platelets", "RBC", "WBC")
    dropped = [src for src, what in ds.box_problems if what.startswith("dropped")]
    assert sorted(p.rsplit("/", 1)[-1] for p in dropped) == ["BloodImage_00338.xml", "BloodImage_00343.xml"]
    assert "dropped 2 degenerate" in caplog.text
    assert all((r.boxes[:, 2:] > r.boxes[:, :2]).all() for r in ds)
