"""The procedural scenes: deterministic by seed, masks that are exactly the drawn objects, captions
that say what the image shows."""

import math

import numpy as np
import pytest

from vitviz.zoo.scenes import COLOURS, SHAPES, caption_scene, classification_scene, coverage, make_dataset, shape_area


def _same(a, b):
    assert np.array_equal(a.image, b.image)
    assert np.array_equal(a.background, b.background)
    assert np.array_equal(a.masks, b.masks)
    assert a.words == b.words and a.label == b.label and a.word_objects == b.word_objects


@pytest.mark.parametrize("fn", [classification_scene, caption_scene])
def test_same_seed_same_scene_other_seed_other_scene(fn):
    _same(fn(123), fn(123))
    assert not np.array_equal(fn(123).image, fn(124).image)
    # a scene does not depend on what was generated before it
    _same(make_dataset("classification" if fn is classification_scene else "caption", [5, 123])[1], fn(123))


def test_golden_captions_and_labels():
    """Pins the generator: the shipped weights were trained and evaluated on these scenes."""
    assert [caption_scene(s).caption for s in range(3)] == [
        "a yellow square below a purple cross",
        "a green diamond right of a blue triangle",
        "a green cross above a blue star",
    ]
    assert [classification_scene(s).label_name for s in range(4)] == ["square", "star", "diamond", "triangle"]


@pytest.mark.parametrize("seed", range(6))
def test_masks_are_the_drawn_objects(seed):
    for scene in (classification_scene(seed), caption_scene(seed)):
        assert scene.image.dtype == np.uint8 and scene.image.shape == (64, 64, 3)
        covered = np.zeros(scene.image.shape[:2], dtype=np.float32)
        for obj in scene.objects:
            full = obj.coverage == 1.0
            assert full.sum() > 0
            # fully covered pixels have exactly the object's colour
            assert (scene.image[full] == np.array(COLOURS[obj.colour], dtype=np.uint8)).all()
            # the mask holds the fully covered pixels and lies within the partly covered ones
            assert (obj.mask >= full).all() and (obj.mask <= (obj.coverage > 0)).all()
            covered += obj.coverage
        # pixels no object touches are the background, unchanged
        free = covered == 0
        assert free.sum() > 0.5 * free.size
        assert np.array_equal(scene.image[free], scene.background[free])


def test_mask_area_and_centre_match_the_geometry():
    yy, xx = np.mgrid[0:64, 0:64]
    for shape in SHAPES:
        for size, centre, angle in [(14.3, (20.2, 41.7), 5.0), (26.0, (33.5, 30.1), -11.0)]:
            cov = coverage(shape, size, centre, angle)
            area = shape_area(shape, size)
            # 16 sub-pixel samples per pixel: the sampled area is within 1.5% of the exact one
            assert cov.sum() == pytest.approx(area, rel=0.015)
            # the centroid of a symmetric shape is its centre (the triangle's is too: equilateral)
            cx = (cov * (xx + 0.5)).sum() / cov.sum()
            cy = (cov * (yy + 0.5)).sum() / cov.sum()
            if shape != "triangle" or angle == 0:
                assert (cx, cy) == pytest.approx(centre, abs=0.05)


def test_square_coverage_hand_computed():
    # a 10x10 axis-aligned square from (10, 10) to (20, 20): exactly 100 whole pixels
    cov = coverage("square", 10 * math.sqrt(2), (15.0, 15.0), 0.0, 32, 32)
    assert cov.sum() == 100 and set(np.unique(cov)) == {0.0, 1.0}
    assert cov[10:20, 10:20].all() and cov[9, :].sum() == 0 and cov[:, 20].sum() == 0
    # shifted by a quarter pixel: the edge pixels are 3/4 and 1/4 covered
    cov = coverage("square", 10 * math.sqrt(2), (15.25, 15.0), 0.0, 32, 32)
    assert cov[12, 10] == 0.75 and cov[12, 20] == 0.25


@pytest.mark.parametrize("seed", range(40))
def test_captions_describe_the_scene(seed):
    s = caption_scene(seed)
    a, b = s.objects
    assert a.colour != b.colour and a.shape != b.shape
    assert a.size > b.size  # the larger object is named first
    assert not (a.mask & b.mask).any()
    assert s.words[:3] == ["a", a.colour, a.shape] and s.words[-3:] == ["a", b.colour, b.shape]
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    rel = " ".join(s.words[3:-3])
    want = (("above" if dy > 0 else "below") if abs(dy) > abs(dx)
            else ("left of" if dx > 0 else "right of"))
    assert rel == want
    assert max(abs(dx), abs(dy)) >= 1.6 * min(abs(dx), abs(dy))  # never ambiguous
    # colour and shape words point at their object; the rest at none
    for w, k in zip(s.words, s.word_objects):
        if w in COLOURS or w in SHAPES:
            assert s.objects[k].colour == w or s.objects[k].shape == w
        else:
            assert k is None
    wm = s.word_masks()
    assert wm[1] is not None and np.array_equal(wm[1], a.mask) and wm[0] is None


def test_classification_scene_label_and_sizes():
    for seed in range(30):
        s = classification_scene(seed)
        assert len(s.objects) == 1 and s.label == SHAPES.index(s.objects[0].shape)
        assert 18 <= s.objects[0].size <= 30
        assert np.array_equal(s.mask, s.objects[0].mask) and s.mask.sum() > 20
    labels = {classification_scene(seed).label for seed in range(60)}
    assert labels == set(range(len(SHAPES)))


def test_unknown_kind_and_shape():
    with pytest.raises(ValueError):
        make_dataset("detection", [0])
    with pytest.raises(ValueError):
        shape_area("hexagon", 10)
