"""Bad COCO input to the dataset and to relighting's training and evaluation: an unreadable image is a
counted skip that leaves everything else as it was, a bad file is an error that names it."""

from __future__ import annotations

import functools
import json
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sos_aug import CocoInstances, label_map_from_coco
from sos_aug.cli import main
from sos_aug.relight import RelightNet
from sos_aug.relight.training.data import InstancePool
from sos_aug.relight.training.evaluate import evaluate, load_instances


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, coco_mini, val_ann):
    """Eight real val2017 images (linked, not copied) and their annotations; of them, one image file
    is missing and one is not an image. Also the annotations of just the six good ones."""
    root = tmp_path_factory.mktemp("damaged")
    data = json.loads(val_ann.read_text())
    annotated = {a["image_id"] for a in data["annotations"] if not a["iscrowd"]}
    infos = sorted((im for im in data["images"] if im["id"] in annotated), key=lambda im: im["id"])[:8]
    (root / "images").mkdir()
    for info in infos[:-1]:
        (root / "images" / info["file_name"]).symlink_to(coco_mini / "val2017" / info["file_name"])
    missing, corrupt = infos[-1], infos[2]
    (root / "images" / corrupt["file_name"]).unlink()
    (root / "images" / corrupt["file_name"]).write_bytes(b"not a JPEG")

    def subset(keep, name):
        ids = {im["id"] for im in keep}
        sub = dict(data, images=keep, annotations=[a for a in data["annotations"] if a["image_id"] in ids])
        (root / name).write_text(json.dumps(sub))
        return root / name

    good = [im for im in infos if im not in (missing, corrupt)]
    return root / "images", subset(infos, "all.json"), subset(good, "good.json"), missing, corrupt


def test_relight_eval_counts_unreadable_images_and_evaluates_the_rest(damaged):
    images, all_ann, good_ann, missing, corrupt = damaged
    net = RelightNet.pretrained()
    run = dict(net=net, with_oracle=False, baselines=False, progress=False, limit=6)
    result = evaluate(all_ann, images, **run)
    assert result["skipped"] == {"corrupt_image": 1, "missing_image": 1}
    assert missing["file_name"] in result["skipped_examples"]["missing_image"]
    assert corrupt["file_name"] in result["skipped_examples"]["corrupt_image"]
    clean = evaluate(good_ann, images, **run)
    assert clean["skipped"] == {} and clean["instances"] == result["instances"] > 0
    assert clean["suites"] == result["suites"]


def test_training_pool_counts_unreadable_images_and_keeps_every_other_instance(damaged):
    images, all_ann, good_ann, _, _ = damaged
    pool, clean = InstancePool(all_ann, images), InstancePool(good_ann, images)
    assert pool.skipped.as_dict() == {"corrupt_image": 1, "missing_image": 1}
    assert pool.image_ids == clean.image_ids and len(pool) == len(clean) > 0
    assert all(torch.equal(a.mask, b.mask) and a.category == b.category
               for a, b in zip(pool.instances, clean.instances))
    evaluated, clean_evaluated = load_instances(all_ann, images), load_instances(good_ann, images)
    assert len(evaluated) == len(clean_evaluated) > 0
    assert all(torch.equal(a[1], b[1]) for a, b in zip(evaluated, clean_evaluated))


def test_dataset_replaces_an_unreadable_image_by_the_next_and_counts_it(damaged):
    images, all_ann, _, missing, corrupt = damaged
    dataset = CocoInstances(all_ann, images)
    ids = [info["id"] for info in dataset.infos]
    broken = ids.index(corrupt["id"])
    with pytest.warns(UserWarning, match=corrupt["file_name"]):
        _, target = dataset[broken]
    assert target["image_id"] == ids[broken + 1]  # a real sample of the next image, its own labels
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        image, target = dataset[broken + 1]
        assert target["image_id"] == ids[broken + 1] and len(target["labels"]) == len(target["masks"]) > 0
    with pytest.warns(UserWarning, match=missing["file_name"]):
        assert dataset[ids.index(missing["id"])][1]["image_id"] == ids[0]  # the last wraps to the first
    assert dataset.skipped.as_dict() == {"corrupt_image": 1, "missing_image": 1}
    with pytest.raises(IndexError):
        dataset[len(dataset)]
    with pytest.warns(UserWarning):
        assert sum(1 for _ in dataset) == len(dataset)  # iteration stops at the end


def test_dataset_over_a_wrong_image_folder_fails_with_the_folder(damaged, tmp_path):
    _, all_ann, _, _, _ = damaged
    with pytest.raises(FileNotFoundError, match=f"{tmp_path / 'nowhere'}: image folder not found"):
        CocoInstances(all_ann, tmp_path / "nowhere")
    dataset = CocoInstances(all_ann, tmp_path)  # a folder, but not of these images
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="8 images in a row could not be read"):
        dataset[0]


@pytest.mark.parametrize("content, field", [("{\"images\": [", "not valid JSON"),
                                            ("{\"images\": []}", "'annotations'"),
                                            ("[1, 2]", "'images'")])
def test_a_bad_annotation_file_is_named_with_what_is_wrong(tmp_path, damaged, content, field):
    images = damaged[0]
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    for load in (lambda: CocoInstances(bad, images), lambda: InstancePool(bad, images),
                 lambda: load_instances(bad, images)):
        with pytest.raises(ValueError, match=field) as err:
            load()
        assert str(bad) in str(err.value)
    if field != "'annotations'":  # the label map reads only the categories
        with pytest.raises(ValueError, match=str(bad)):
            label_map_from_coco(bad)


def test_relight_commands_name_a_missing_folder_or_bad_weights(tmp_path, damaged, capsys):
    images, all_ann, _, _, _ = damaged
    assert main(["relight", "eval", "--coco", str(all_ann), "--images", str(tmp_path / "nowhere"), "--quiet"]) == 2
    assert f"{tmp_path / 'nowhere'}: image folder not found" in capsys.readouterr().err
    (tmp_path / "w.pt").write_bytes(b"not weights")
    assert main(["relight", "eval", "--coco", str(all_ann), "--images", str(images), "--weights",
                 str(tmp_path / "w.pt"), "--quiet"]) == 2
    assert f"{tmp_path / 'w.pt'}: not RelightNet weights" in capsys.readouterr().err


def test_weights_are_saved_atomically_and_load_back(tmp_path):
    net = RelightNet.pretrained()
    path = tmp_path / "w.pt"
    path.write_bytes(b"an older file")
    net.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["w.pt"]  # no temporary left behind
    again = RelightNet.load(path)
    assert all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), again.state_dict().values()))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), h=st.integers(20, 700), w=st.integers(20, 700),
       count=st.integers(0, 8), reach=st.floats(0.1, 4.0))
def test_polygons_rasterised_in_their_boxes_are_the_whole_image_rasterisation(val_ann, seed, h, w, count, reach):
    """coco.polygon_masks (what the mmdet and detectron2 adapters turn polygons into) gives, bit for
    bit, pycocotools' rasterisation of each instance over the whole image, on real COCO polygons
    (several parts per instance) scaled and moved anywhere, partly or wholly outside the image."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from sos_aug.coco import polygon_masks

    polygons = _polygons(val_ann)
    rng = np.random.default_rng(seed)
    instances = []
    for j in rng.integers(0, len(polygons), count):
        dx, dy = rng.uniform(-300, 700, 2)
        instances.append([np.asarray(p) * reach + np.tile([dx, dy], len(p) // 2) for p in polygons[j]])
    got = polygon_masks(instances, h, w)
    assert got.shape == (count, h, w) and got.dtype == torch.bool
    for mask, parts in zip(got, instances):
        whole = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([p.tolist() for p in parts], h, w)))
        assert torch.equal(mask, torch.from_numpy(whole).bool())


def test_every_real_polygon_rasterised_in_its_box_is_the_whole_image_rasterisation(train_ann, val_ann):
    """Every polygon instance of coco-mini at its own image's size (pycocotools snaps points to a
    1/5-pixel grid, and moving a point first can round it across a step: the box must not)."""
    import numpy as np
    from pycocotools import mask as mask_utils

    from sos_aug.coco import polygon_masks

    checked = 0
    for ann_file in (train_ann, val_ann):
        data = json.loads(ann_file.read_text())
        sizes = {im["id"]: (im["height"], im["width"]) for im in data["images"]}
        for a in data["annotations"]:
            if not isinstance(a["segmentation"], list):
                continue
            h, w = sizes[a["image_id"]]
            parts = [p for p in a["segmentation"] if len(p) >= 6 and len(p) % 2 == 0]
            whole = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, h, w)))
            assert np.array_equal(polygon_masks([parts], h, w)[0].numpy(), whole.astype(bool)), a["id"]
            checked += 1
    assert checked > 1000


@functools.cache
def _polygons(val_ann) -> list:
    anns = json.loads(val_ann.read_text())["annotations"]
    polygons = [a["segmentation"] for a in anns if isinstance(a["segmentation"], list)]
    assert any(len(p) > 1 for p in polygons)  # instances of several parts are among them
    return polygons
