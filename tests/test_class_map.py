"""Fine-tuning onto other classes: the class heads' report when the class counts differ, and model.class_map, which
copies the checkpoint's class rows of the classes both sides have into ours."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
from conftest import one_thread_for_module

import dset
from dset.config import ConfigError
from dset.engine.checkpoint import atomic_save, weights_checkpoint
from dset.engine.distributed import DistInfo
from dset.engine.initial_weights import build_training_model
from dset.engine.loop import TrainingRun
from dset.models.coco_classes import COCO_CATEGORY_IDS, COCO_CLASS_NAMES
from dset.models.detector import CLASS_HEAD_PREFIXES, load_checkpoint

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread_for_module)

SMALL = ["model.decoder.num_queries=20", "model.decoder.num_denoising=10"]   # denoising on: its class embedding too
OURS = ["pedestrian", "car", "scooter", "dog"]   # not COCO's order; scooter is no COCO class
CLASS_MAP = {"car": "car", "person": "pedestrian", "dog": "dog"}


def _with_random_heads(model):
    """Class heads with random weights and biases (a fresh model's biases are all the same prior value, which
    would hide a row copied from the wrong class)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.startswith(CLASS_HEAD_PREFIXES):
                p.normal_()
    return model


@pytest.fixture(scope="module")
def coco_file(module_tmp):
    """A published-layout RT-DETR checkpoint with 80-class heads (``ema.module``, no class names in it)."""
    source = _with_random_heads(dset.build_model("rtdetr_r18", SMALL)).eval()
    path = module_tmp("weights") / "rtdetr_r18_coco.pth"
    torch.save({"ema": {"module": source.state_dict(), "updates": 1}}, path)
    return path, source


def _ours():
    return dset.build_model("rtdetr_r18", SMALL + [f"model.num_classes={len(OURS)}"])


def _head_keys(model):
    return [k for k in model.state_dict() if k.startswith(CLASS_HEAD_PREFIXES)]


def _score_heads(model):
    d = model.decoder
    return [d.enc_score_head, *d.dec_score_head]


def test_coco_classes_follow_rtdetr_label_order():
    assert len(COCO_CLASS_NAMES) == 80 and len(set(COCO_CLASS_NAMES)) == 80
    assert list(COCO_CATEGORY_IDS) == sorted(COCO_CATEGORY_IDS) and COCO_CATEGORY_IDS[-1] == 90
    assert COCO_CLASS_NAMES[:3] == ("person", "bicycle", "car") and COCO_CLASS_NAMES[79] == "toothbrush"
    assert COCO_CLASS_NAMES.index("dog") == 16   # category id 18, after the gap at 12
    assert set(range(1, 91)) - set(COCO_CATEGORY_IDS) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}


def test_class_map_copies_the_mapped_rows_and_loads_every_other_tensor(coco_file):
    path, source = coco_file
    model = _ours()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    report = load_checkpoint(model, path, class_map=CLASS_MAP, class_names=OURS)
    model.eval()
    file_state, ours = source.state_dict(), model.state_dict()

    # the same features through both models' score heads: our logit of each mapped class is the file's logit
    # of its class; scooter's is what the fresh head computes
    feats = torch.randn(2, 7, 256)
    with torch.no_grad():
        for file_head, our_head, fresh_key in zip(_score_heads(source), _score_heads(model),
                                                  ["decoder.enc_score_head"] + [f"decoder.dec_score_head.{i}"
                                                                                for i in range(3)]):
            file_logits, our_logits = file_head(feats), our_head(feats)
            for file_class, our_class in CLASS_MAP.items():
                j, i = OURS.index(our_class), COCO_CLASS_NAMES.index(file_class)
                torch.testing.assert_close(our_logits[..., j], file_logits[..., i], rtol=0, atol=1e-6)
                assert torch.equal(ours[f"{fresh_key}.weight"][j], file_state[f"{fresh_key}.weight"][i])
                assert torch.equal(ours[f"{fresh_key}.bias"][j], file_state[f"{fresh_key}.bias"][i])
            s = OURS.index("scooter")
            assert torch.equal(ours[f"{fresh_key}.weight"][s], fresh[f"{fresh_key}.weight"][s])
            assert torch.equal(ours[f"{fresh_key}.bias"][s], fresh[f"{fresh_key}.bias"][s])

    # the denoising class embedding: the mapped rows are the file's, scooter's and the padding row (index 4) fresh
    embed = "decoder.denoising_class_embed.weight"
    assert ours[embed].shape == (5, 256) and file_state[embed].shape == (81, 256)
    for file_class, our_class in CLASS_MAP.items():
        assert torch.equal(ours[embed][OURS.index(our_class)], file_state[embed][COCO_CLASS_NAMES.index(file_class)])
    assert torch.equal(ours[embed][OURS.index("scooter")], fresh[embed][OURS.index("scooter")])
    assert torch.equal(ours[embed][4], torch.zeros(256))   # the padding row stays the padding row

    # every other tensor is the file's
    others = [k for k in ours if not k.startswith(CLASS_HEAD_PREFIXES)]
    assert report.loaded == sorted(others)
    assert all(torch.equal(ours[k], file_state[k]) for k in others)
    assert sorted(report.class_heads_reinitialised) == sorted(_head_keys(model))
    assert report.carried_classes == CLASS_MAP and report.fresh_classes == ["scooter"]


def test_mapped_logits_of_the_whole_model_equal_the_checkpoints_before_training(tmp_path):
    """Same input, eval mode, before any training step: our model's logit of each mapped class is the checkpoint's
    logit of its class, and the boxes are the checkpoint's. Query selection ranks tokens by their best class score;
    the checkpoint's other 77 classes are given a bias no token can overcome, so that both models rank by the same
    three classes and select the same queries (with them, a token the checkpoint found most "truck"-like would
    rank differently, and the comparison would be of other queries)."""
    torch.manual_seed(0)
    source = _with_random_heads(dset.build_model("rtdetr_r18", SMALL))
    ours, class_map = ["car", "dog", "pedestrian"], {"person": "pedestrian", "car": "car", "dog": "dog"}
    with torch.no_grad():
        others = [i for i, n in enumerate(COCO_CLASS_NAMES) if n not in class_map]
        source.decoder.enc_score_head.bias[others] = -1e4
    path = tmp_path / "coco.pth"
    torch.save({"ema": {"module": source.state_dict()}}, path)
    cfg = dset.load_config("rtdetr_r18", SMALL + [
        "model.num_classes=3", f"model.checkpoint={path}", "data.classes=[car, dog, pedestrian]",
        "model.class_map={person: pedestrian, car: car, dog: dog}"])
    model, _, _ = build_training_model(cfg)
    images = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        expected, got = source.eval()(images), model.eval()(images)
    file_rows = [COCO_CLASS_NAMES.index(f) for o in ours for f, t in class_map.items() if t == o]
    assert file_rows == [2, 16, 0]
    assert got["pred_logits"].shape == (2, 20, 3)
    torch.testing.assert_close(got["pred_logits"], expected["pred_logits"][..., file_rows], rtol=0, atol=1e-6)
    torch.testing.assert_close(got["pred_boxes"], expected["pred_boxes"], rtol=0, atol=1e-6)
    # the comparison has teeth: the labels in our order are not the file's
    assert not torch.allclose(got["pred_logits"], expected["pred_logits"][..., :3], atol=1e-3)


def test_head_report_without_class_map_says_every_class_starts_from_scratch(coco_file):
    path, _ = coco_file
    model = _ours()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # reported, no longer a UserWarning
        report = load_checkpoint(model, path, class_names=OURS)
    assert all(torch.equal(model.state_dict()[k], fresh[k]) for k in _head_keys(model))
    assert report.file_num_classes == 80 and report.model_num_classes == 4
    assert report.class_heads_reinitialised["decoder.enc_score_head.weight"] == "file [80, 256], model [4, 256]"
    assert report.class_heads_reinitialised["decoder.denoising_class_embed.weight"] == "file [81, 256], model [5, 256]"
    assert report.carried_classes == {} and report.fresh_classes == OURS
    text = report.head_report()
    assert text.splitlines()[0] == ("class heads: 80 classes in the file (COCO's, in RT-DETR's label order), 4 in the "
                                    "model (pedestrian, car, scooter, dog)")
    assert "decoder.dec_score_head.{0,1,2} (file [80, 256], model [4, 256])" in text
    assert "every class starts from scratch (pedestrian, car, scooter, dog): set model.class_map=" in text
    assert "classes both have by name: model.class_map={car: car, dog: dog}" in text
    assert "9 class-head tensors re-initialised (80 classes in the file, 4 in the model)" in report.summary()


def test_head_report_with_class_map_names_the_classes_carried_over_and_fresh(coco_file):
    path, _ = coco_file
    report = load_checkpoint(_ours(), path, class_map=CLASS_MAP, class_names=OURS)
    lines = report.head_report().splitlines()
    assert lines[0].startswith("class heads: 80 classes in the file (COCO's, in RT-DETR's label order), 4 in the model")
    assert "then the rows of the classes in model.class_map copied from the file" in lines[1]
    assert lines[2] == "  carried over (file -> ours): car -> car, person -> pedestrian, dog -> dog"
    assert lines[3] == "  start fresh: scooter"
    assert "3 of our 4 classes carried over by model.class_map" in report.summary()


def test_equal_counts_load_the_heads_whole_and_a_class_map_still_selects_rows_by_name(tmp_path):
    """Our own checkpoint, which names its classes (category_names): with the same count and no map the heads
    load whole (by label); with a map they are chosen by name, whatever the counts."""
    source = _with_random_heads(_ours())
    file_names = ["dog", "car", "pedestrian", "tram"]
    path = tmp_path / "best.pt"
    torch.save({"ema": {"module": source.state_dict()}, "category_names": file_names}, path)

    whole = _ours()
    report = load_checkpoint(whole, path, class_names=OURS)
    assert not report.class_heads_reinitialised and sorted(report.class_heads_loaded) == sorted(_head_keys(whole))
    assert all(torch.equal(whole.state_dict()[k], source.state_dict()[k]) for k in _head_keys(whole))
    text = report.head_report()
    assert text.startswith("class heads loaded: 4 classes in the file and in the model")
    assert "by label, and 3 labels name other classes in the file (dog -> pedestrian, pedestrian -> scooter, " \
           "tram -> dog): model.class_map maps rows by name" in text

    mapped = _ours()
    fresh = mapped.state_dict()["decoder.dec_score_head.1.weight"].clone()
    report = load_checkpoint(mapped, path, class_map={"dog": "dog", "car": "car", "pedestrian": "pedestrian"},
                             class_names=OURS)
    w, file_w = mapped.state_dict()["decoder.dec_score_head.1.weight"], source.state_dict()[
        "decoder.dec_score_head.1.weight"]
    for name in ("dog", "car", "pedestrian"):
        assert torch.equal(w[OURS.index(name)], file_w[file_names.index(name)])
    assert torch.equal(w[OURS.index("scooter")], fresh[OURS.index("scooter")])   # tram is not carried over
    assert report.fresh_classes == ["scooter"] and "class heads: 4 classes in the file (its category_names)" in \
        report.head_report()


def test_class_map_errors_name_the_key_and_the_value(coco_file, tmp_path):
    path, _ = coco_file
    with pytest.raises(ConfigError, match=r"model.class_map: 'persn' is not a class of .*rtdetr_r18_coco.pth "
                                          r"\(80 classes, COCO's.*close names: person"):
        load_checkpoint(_ours(), path, class_map={"persn": "pedestrian"}, class_names=OURS)
    with pytest.raises(ConfigError, match=r"model.class_map.car: 'auto' is not one of our 4 classes "
                                          r"\(pedestrian, car, scooter, dog\)"):
        load_checkpoint(_ours(), path, class_map={"car": "auto"}, class_names=OURS)
    with pytest.raises(ConfigError, match="model.class_map: 'car' and 'truck' both map onto our class 'car'"):
        dset.load_config("rtdetr_r18", ["model.class_map={car: car, truck: car}"])
    with pytest.raises(ConfigError, match="model.class_map: a checkpoint class name must be a non-empty string"):
        dset.load_config("rtdetr_r18", ["model.class_map={' ': car}"])
    with pytest.raises(ConfigError, match=r"model.class_map: 'st. bernard': a checkpoint class name with a '\.' "):
        dset.load_config("rtdetr_r18", ["model.class_map={st. bernard: dog}"])
    with pytest.raises(ConfigError, match="model.class_map: must map checkpoint class names to ours"):
        dset.load_config("rtdetr_r18", ["model.class_map={}"])
    with pytest.raises(ConfigError, match="model.class_map: .* is set, but model.checkpoint is not"):
        build_training_model(dset.load_config("rtdetr_r18", SMALL + ["model.class_map={car: car}"]))
    with pytest.raises(ConfigError, match="model.class_map: this model's class names are unknown: set data.classes"):
        load_checkpoint(_ours(), path, class_map=CLASS_MAP)
    with pytest.raises(ConfigError, match=r"model.class_map: data.classes names 4 classes, but model.num_classes is "
                                          r"80: set model.num_classes=4"):
        dset.build_model("rtdetr_r18", SMALL + [f"model.checkpoint={path}", "data.classes=[a, b, c, d]",
                                                "model.class_map={car: b}"])
    # a file of 4 classes that does not name them: neither ours nor a published 80-class one
    unnamed = tmp_path / "unnamed.pth"
    torch.save({"model": _ours().state_dict()}, unnamed)
    with pytest.raises(ConfigError, match="unnamed.pth names no classes.*its 4 classes are not COCO's 80"):
        load_checkpoint(_ours(), unnamed, class_map={"car": "car"}, class_names=OURS)
    bad_names = tmp_path / "bad_names.pth"
    torch.save({"model": _ours().state_dict(), "category_names": ["car", "dog"]}, bad_names)
    with pytest.raises(ValueError, match=r"bad_names.pth: category_names \(\['car', 'dog'\]\) should be 4 names"):
        load_checkpoint(_ours(), bad_names, class_map={"car": "car"}, class_names=OURS)


def test_the_class_map_of_the_configuration_reaches_the_model(coco_file, caplog):
    """From the command-line form of the configuration, through build_training_model, with our class names from
    data.classes; the run's log shows the head report."""
    path, source = coco_file
    cfg = dset.load_config("rtdetr_r18", SMALL + [
        "model.num_classes=4", f"model.checkpoint={path}", "data.classes=[pedestrian, car, scooter, dog]",
        "model.class_map={car: car, person: pedestrian}"])
    with caplog.at_level(logging.INFO, logger="dset"):
        model, pretrained, reports = build_training_model(cfg)
    w = model.state_dict()["decoder.enc_score_head.weight"]
    assert torch.equal(w[1], source.state_dict()["decoder.enc_score_head.weight"][COCO_CLASS_NAMES.index("car")])
    assert torch.equal(w[0], source.state_dict()["decoder.enc_score_head.weight"][0])   # person -> pedestrian
    assert not pretrained & set(_head_keys(model))   # heads not loaded whole are new parts (train.lr)
    assert reports[-1].fresh_classes == ["scooter", "dog"]
    logged = caplog.text
    assert "class heads: 80 classes in the file" in logged
    assert "carried over (file -> ours): car -> car, person -> pedestrian" in logged
    assert "start fresh: scooter, dog" in logged


def test_a_run_passes_its_data_set_category_names(tmp_path):
    """TrainingRun: our class names are the data set's categories (synthetic: circle, square, triangle)."""
    source = _with_random_heads(dset.build_model("rtdetr_r18", SMALL + ["model.num_classes=5"]))
    file_names = ["triangle", "hexagon", "circle", "moon", "square"]
    path = tmp_path / "best.pt"
    torch.save({"ema": {"module": source.state_dict()}, "category_names": file_names}, path)
    cfg = dset.load_config("rtdetr_r18", SMALL + [
        "data.synthetic.num_classes=3", "data.synthetic.num_train=2", "data.synthetic.num_val=1",
        "data.synthetic.image_size=64", f"data.synthetic.root={tmp_path / 'synthetic'}", "data.image_size=64",
        "model.eval_spatial_size=[64,64]", "run.device=cpu", "run.progress=false",
        f"model.checkpoint={path}", "model.class_map={triangle: triangle, circle: circle}"])
    run = TrainingRun(cfg, tmp_path / "run", hooks=[], resume=False, dinfo=DistInfo())
    assert run.data.category_names == ["circle", "square", "triangle"]
    w, file_w = run.model_core.state_dict()["decoder.dec_score_head.2.bias"], source.state_dict()[
        "decoder.dec_score_head.2.bias"]
    assert w[0] == file_w[2] and w[2] == file_w[0]
    assert w[1] == pytest.approx(-4.59512, abs=1e-5)   # square starts fresh: the prior-probability bias (p=0.01)

    # the run's own checkpoints name its classes (category_names), so a later run maps from them by name
    best = tmp_path / "best.pt"
    atomic_save(weights_checkpoint(run._training_state(0, {}, [])), best)
    assert torch.load(best, weights_only=True)["category_names"] == ["circle", "square", "triangle"]
    target = dset.build_model("rtdetr_r18", SMALL + ["model.num_classes=2"])
    report = load_checkpoint(target, best, class_map={"triangle": "tri", "circle": "round"},
                             class_names=["round", "tri"])
    assert report.file_class_names_from == "its category_names"
    ema = run.ema.module.state_dict()["decoder.enc_score_head.weight"]
    got = target.state_dict()["decoder.enc_score_head.weight"]
    assert torch.equal(got[0], ema[0]) and torch.equal(got[1], ema[2]) and not torch.equal(ema[0], ema[2])
