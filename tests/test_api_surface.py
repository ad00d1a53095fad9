"""The public contract (DESIGN.md) is locked: these names exist and resolve."""

import inspect

import vitviz

CONTRACT = {
    "list_models", "load_model", "wrap", "capture", "VisionModel", "TokenLayout", "AttentionMaps",
    "CrossAttentionMaps", "rollout", "cls_maps", "overlay", "caption", "word_grids", "pos_similarity",
}


# every public name of the package root, exactly: adding one is a decision, removing one breaks users
ALL = [
    "AttentionMaps", "Caption", "CaptureError", "CheckpointError", "CrossAttentionMaps", "Explorer", "ImageError",
    "IncompleteCaptureWarning", "LayoutError", "MissingExtraError", "ModelNotFoundError", "Preprocess",
    "PreprocessError", "Recording", "TextMaps", "TokenLayout", "UnplacedAttentionError", "VisionModel", "VitvizError",
    "WeightsNotFoundError", "attention_entropy",
    "attention_flow", "build_gallery", "caption", "capture", "chefer_relevance", "cls_maps", "explain_text",
    "explore", "grad_rollout", "list_models", "load_image", "load_model", "mass_masks", "mean_attention_distance",
    "merge_gallery", "overlay", "pos_similarity", "prefix_attention_share", "query_maps", "relevance", "rollout",
    "to_rgb_array", "word_grids", "wrap", "metrics", "zoo", "gallery", "__version__",
]


def test_the_root_exports_exactly_these_names():
    assert vitviz.__all__ == ALL
    assert sorted(dir(vitviz)) == sorted(ALL)


def test_contract_names_are_public_and_resolve():
    assert CONTRACT <= set(vitviz.__all__)
    for name in vitviz.__all__:
        assert getattr(vitviz, name) is not None, name


def test_capture_stays_callable_after_importing_the_attention_subpackage():
    import vitviz.attention._adapter  # noqa: F401

    assert callable(vitviz.capture) and inspect.isfunction(vitviz.capture)


def test_signatures_of_the_contract():
    p = inspect.signature(vitviz.load_model).parameters
    assert list(p)[:1] == ["name"]
    assert {"weights", "pretrained", "num_classes", "image_size", "device"} <= set(p)
    assert p["pretrained"].default is True and p["device"].default == "cpu"
    r = inspect.signature(vitviz.rollout).parameters
    assert r["head_fusion"].default == "mean" and r["discard_ratio"].default == 0.0
    assert r["start_layer"].default == 0
    assert inspect.signature(vitviz.cls_maps).parameters["layer"].default == -1
    o = inspect.signature(vitviz.overlay).parameters
    assert o["cmap"].default == "inferno" and o["alpha"].default is None and o["smooth"].default is False
    w = inspect.signature(vitviz.wrap).parameters
    assert {"grid", "num_prefix", "tokenizer"} <= set(w)


def test_token_layout_defaults():
    layout = vitviz.TokenLayout(grid=(14, 14))
    assert layout.num_prefix == 1 and layout.has_cls and layout.num_tokens == 197


def test_token_layout_without_grid_is_deprecated():
    import pytest

    with pytest.warns(DeprecationWarning, match="grid="):
        layout = vitviz.TokenLayout()
    assert layout.grid == (14, 14)  # the old default, for code written against v0


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError):
        _ = vitviz.not_a_name


def test_metrics_submodule():
    assert callable(vitviz.evaluate.pointing_game)


def test_explore_stays_callable_after_importing_its_module():
    import vitviz.explorer  # noqa: F401

    assert inspect.isfunction(vitviz.explore) and inspect.isclass(vitviz.Explorer)
