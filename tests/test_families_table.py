"""The family table (docs/reference/families.md) says only what the tests write down.

Each row of the table names, in its "checked by" column, the written-down expectations of its
family: ``test_capture_accounting[name]`` (``FAMILIES`` there), ``test_families_cli[model]``
(``FAMILIES``), ``test_capture_architectures[name]`` (``SWEEP``, ``REFUSED``, ``HIERARCHICAL``),
``test_capture_transformers[case]`` (``VISION_CASES``), ``test_capture_timm[model]`` (``CASES``),
or ``file::test_name``, a test of that family alone, whose outcome is written down here in
``FUNCTION_OUTCOMES``. The test files are read as source (``ast``), not imported: no test file
imports another, and their ``build`` lambdas are never run here.

A row fails when it names no test, or a test that writes nothing down; when it says "one grid",
"stages" or "refused" and a test it names writes down another outcome (a family that falls from
maps to a refusal, or the reverse, fails here as well as in that test); when it does not give the
refusal's reason as the test matches it; when it claims ``rec.pool`` and the test writes down none
(or the reverse); when its skipped attention differs from the test's ``rec.skipped``. A family that
a test writes down and no row names fails too, so the table lists every tested family.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
TABLE = TESTS.parent / "docs" / "reference" / "families.md"
HEADER = ["family", "what capture gives", "skipped, with the reason", "checked by"]
OUTCOMES = ("one grid", "stages", "refused")

# tests of one family, named in the table as ``file::test_name``: the outcome each checks
FUNCTION_OUTCOMES = {
    "test_capture_timm::test_eva_and_beit_equal_the_probabilities_of_their_sdpa_calls": "one grid",
    "test_capture_transformers::test_data2vec_vision_equals_eager_and_its_own_sdpa_calls": "one grid",
    "test_capture_architectures::test_attention_pool_head_is_read_as_pool": "one grid",
    "test_capture_architectures::test_timm_sam_windowed_and_global_layers_exact": "one grid",
    "test_capture_architectures::test_yolos_detection_tokens_after_the_patches": "one grid",
    "test_capture_architectures::test_mae_visible_patches_placed_on_the_full_grid": "one grid",
    "test_capture_architectures::test_timm_swin_windows_stitched_exactly": "stages",
    "test_capture_architectures::test_transformers_swin_windows_equal_eager_attentions": "stages",
    "test_capture_architectures::test_transformers_swinv2_windows_equal_eager_attentions": "stages",
    "test_capture_architectures::test_timm_maxvit_block_and_grid_attention_on_the_grid": "stages",
    "test_capture_architectures::test_window_layers_are_kept_as_windows_and_read_without_the_dense_matrix": "stages",
    "test_capture_architectures::test_timm_mobilevit_unfolded_sequences_on_the_grid": "stages",
    "test_capture_architectures::test_timm_pit_stages_keep_the_class_token": "stages",
    "test_capture_accounting::test_twins_locally_grouped_attention_stitched_exactly": "stages",
    "test_capture_accounting::test_efficientvit_msra_windows_and_cascaded_heads": "stages",
    "test_capture_accounting::test_cascaded_heads_gradients_equal_autograd": "stages",
    "test_capture_accounting::test_convit_gpsa_records_the_gated_mixture": "stages",
    "test_capture_architectures::test_cait_class_attention_exact_as_pool": "refused",
    "test_capture_architectures::test_sequences_vitviz_cannot_place_are_refused": "refused",
    "test_capture_accounting::test_videomae_layout_is_read_not_guessed": "one grid",
    "test_video_capture::test_joint_space_time_attention_equals_eager_output_attentions": "one grid",
    "test_video_capture::test_timesformer_divided_attention_equals_its_own_probabilities_and_a_brute_force_scatter":
        "one grid",
    "test_video_capture::test_timesformer_gradients_are_exact_for_the_placed_matrices": "one grid",
    "test_video_capture::test_a_late_frame_query_maps_onto_the_late_frame": "one grid",
    "test_video_capture::test_vivit_cls_map_of_a_late_frame_lands_on_it": "one grid",
    "test_video_capture::test_video_relevance_batched_equals_one_by_one": "one grid",
    "test_video_capture::test_video_lrp_pools_each_tubelets_frames_and_patch_pixels": "one grid",
    "test_video_capture::test_videomae_pretraining_scatters_the_visible_tubes": "one grid",
    "test_video_capture::test_other_video_models_are_refused_with_the_reason": "refused",
}

# the lists of families the tests write down, each of which the table must name in full
FAMILY_LISTS = ("test_capture_accounting", "test_families_cli", "test_capture_architectures",
                "test_capture_transformers", "test_capture_timm")


@dataclass(frozen=True)
class Expectation:
    """One written-down outcome: ``reason`` a regex of the refusal, ``pool`` whether ``rec.pool``
    is given, ``skipped`` the names in ``rec.skipped`` (None: not written down there)."""

    source: str
    outcome: str
    reason: str | None = None
    pool: bool | None = None
    skipped: frozenset | None = None


@dataclass(frozen=True)
class Row:
    family: str
    gives: str
    skipped: str
    checked_by: str


# -- the test files, read as source ---------------------------------------------------------------

def parse(name: str) -> ast.Module:
    path = TESTS / f"{name}.py"
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def assigned(tree: ast.Module, name: str) -> ast.expr:
    """The value of the module-level assignment ``name = ...``."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in node.targets):
            return node.value
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id == name:
            return node.value
    raise AssertionError(f"no module-level {name} = ... found")


def constants(tree: ast.Module) -> dict:
    """Module-level names bound to literals (``HIER = "one set of tokens"``)."""
    out = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                out[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass
    return out


def fields(tree: ast.Module, cls: str) -> list[str]:
    """The field names of a dataclass defined in the module, in order."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name == cls:
            return [s.target.id for s in node.body if isinstance(s, ast.AnnAssign)]
    raise AssertionError(f"no class {cls} found")


def evaluate(node: ast.expr, consts: dict):
    if isinstance(node, ast.Name) and node.id in consts:
        return consts[node.id]
    return ast.literal_eval(node)


def call_values(call: ast.Call, names: list[str], consts: dict, wanted: set[str]) -> dict:
    """The literal arguments ``wanted`` of a dataclass constructor call, by field name."""
    bound = dict(zip(names, call.args))
    bound.update({k.arg: k.value for k in call.keywords})
    return {k: evaluate(v, consts) for k, v in bound.items() if k in wanted}


def stage_outcome(stages, refused) -> str:
    """``stages``: ``(layers, grid, prefix, key grid or None, heads)`` per stage."""
    if refused is not None:
        return "refused"
    return "one grid" if len(stages) == 1 and stages[0][3] is None else "stages"


def outcome_expectation(source: str, v: dict) -> Expectation:
    """From the fields of an accounting ``Family`` or an architectures ``Outcome``."""
    stages, refused = v.get("stages", []), v.get("refused")
    return Expectation(source, stage_outcome(stages, refused), reason=refused, pool=v.get("pool") is not None,
                       skipped=frozenset(v.get("skipped", {})))


def accounting() -> list[Expectation]:
    tree = parse("test_capture_accounting")
    names, consts = fields(tree, "Family"), constants(tree)
    out = []
    for call in assigned(tree, "FAMILIES").elts:
        v = call_values(call, names, consts, {"name", "stages", "refused", "pool", "skipped"})
        out.append(outcome_expectation(f"test_capture_accounting[{v['name']}]", v))
    return out


def cli() -> list[Expectation]:
    tree = parse("test_families_cli")
    names, consts = fields(tree, "Family"), constants(tree)
    out = []
    for call in assigned(tree, "FAMILIES").elts:
        v = call_values(call, names, consts, {"model", "stages", "rollout", "cls_exit", "cls_error"})
        source = f"test_families_cli[{v['model']}]"  # the tests' ids are the model names
        if v.get("cls_exit", 0):
            out.append(Expectation(source, "refused", reason=re.escape(v.get("cls_error", ""))))
        elif len(v["stages"]) == 1 and isinstance(v["rollout"], tuple):
            out.append(Expectation(source, "one grid"))
        else:
            out.append(Expectation(source, "stages"))
    return out


def architectures() -> list[Expectation]:
    tree = parse("test_capture_architectures")
    names, consts = fields(tree, "Outcome"), constants(tree)
    out = []
    for entry in assigned(tree, "SWEEP").elts:  # (timm name, kwargs, size, Outcome(...))
        name, call = ast.literal_eval(entry.elts[0]), entry.elts[3]
        v = call_values(call, names, consts, {"stages", "refused", "pool", "skipped"})
        out.append(outcome_expectation(f"test_capture_architectures[{name}]", v))
    for entry in assigned(tree, "REFUSED").elts:  # (timm name, kwargs, reason)
        name, reason = ast.literal_eval(entry.elts[0]), ast.literal_eval(entry.elts[2])
        out.append(Expectation(f"test_capture_architectures[{name}]", "refused", reason=reason))
    hierarchical = assigned(tree, "HIERARCHICAL")  # {case: (build, [(grid, prefix, key grid, heads)])}
    for key, value in zip(hierarchical.keys, hierarchical.values):
        stages = [(1, *s) for s in ast.literal_eval(value.elts[1])]
        out.append(Expectation(f"test_capture_architectures[{ast.literal_eval(key)}]", stage_outcome(stages, None)))
    return out


def transformers_cases() -> list[Expectation]:
    cases = assigned(parse("test_capture_transformers"), "VISION_CASES")  # {case: (build, hw, kw, TokenLayout)}
    for value in cases.values:
        layout = value.elts[-1]
        assert isinstance(layout, ast.Call) and getattr(layout.func, "id", "") == "TokenLayout"
    return [Expectation(f"test_capture_transformers[{ast.literal_eval(k)}]", "one grid") for k in cases.keys]


def timm_cases() -> list[Expectation]:
    cases = assigned(parse("test_capture_timm"), "CASES")  # (name, kwargs, prefix, hw, grid): one grid
    return [Expectation(f"test_capture_timm[{ast.literal_eval(e.elts[0])}]", "one grid") for e in cases.elts]


def defined(ref: str) -> bool:
    file, name = ref.split("::")
    return any(isinstance(n, ast.FunctionDef) and n.name == name for n in parse(file).body)


def functions() -> list[Expectation]:
    """The tests of one family that exist (one renamed or gone fails the rows naming it)."""
    return [Expectation(ref, outcome) for ref, outcome in FUNCTION_OUTCOMES.items() if defined(ref)]


def expectations() -> dict[str, list[Expectation]]:
    """Every written-down outcome by the name the table gives it (a name may have several:
    a model in both the sweep and a test of its own is one id)."""
    out: dict[str, list[Expectation]] = {}
    for e in accounting() + cli() + architectures() + transformers_cases() + timm_cases() + functions():
        out.setdefault(e.source, []).append(e)
    return out


# -- the table --------------------------------------------------------------------------------------

def table_rows(text: str) -> list[Row]:
    """The rows of every table in ``text`` whose header is the family header."""
    rows, inside = [], False
    for line in text.splitlines():
        if not line.startswith("|"):
            inside = False
            continue
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells == HEADER:
            inside = True
        elif inside and not set("".join(cells)) <= set("-: "):
            assert len(cells) == len(HEADER), f"a family row without {len(HEADER)} cells: {line}"
            rows.append(Row(*cells))
    return rows


REF = re.compile(r"`(test_\w+(?:\[[^\]`]+\]|::test_\w+))`")


def claimed_outcome(gives: str) -> str | None:
    m = re.match(r"\*\*([^*]+)\*\*", gives)
    return m.group(1) if m and m.group(1) in OUTCOMES else None


def problems(row: Row, written: dict[str, list[Expectation]]) -> list[str]:
    """What is wrong with one row against the written-down outcomes (nothing: [])."""
    out = []
    refs = REF.findall(row.checked_by)
    if not refs:
        out.append(f"{row.family}: names no test that writes its outcome down")
    claimed = claimed_outcome(row.gives)
    if claimed is None:
        out.append(f"{row.family}: 'what capture gives' does not start with one of {OUTCOMES} in bold")
    claims_pool = "`rec.pool`" in row.gives
    skips = frozenset(re.findall(r"`([^`]+)`", row.skipped))
    skips_written = False
    for ref in refs:
        if ref not in written:
            out.append(f"{row.family}: names {ref}, which no test writes down")
            continue
        for e in written[ref]:
            if claimed is not None and e.outcome != claimed:
                out.append(f"{row.family}: the table says {claimed}, {ref} writes down {e.outcome}")
            if e.reason is not None and claimed == "refused" and not re.search(e.reason, row.gives, re.I):
                out.append(f"{row.family}: the refusal's reason {e.reason!r} ({ref}) is not in the table")
            if e.pool is not None and e.pool != claims_pool:
                out.append(f"{row.family}: the table {'says' if claims_pool else 'does not say'} `rec.pool`, "
                           f"{ref} writes down {'a' if e.pool else 'no'} pool")
            if e.skipped is not None:
                skips_written = True
                if e.skipped != skips:
                    out.append(f"{row.family}: the table skips {sorted(skips)}, {ref} writes down "
                               f"rec.skipped {sorted(e.skipped)}")
    if skips and not skips_written:
        out.append(f"{row.family}: skips {sorted(skips)}, which no test it names writes down")
    return out


ROWS = table_rows(TABLE.read_text(encoding="utf-8"))
WRITTEN = expectations()


def test_the_table_and_the_tests_are_found():
    """Not vacuous: the table's rows and every list of written-down families are read."""
    assert len(ROWS) >= 48
    families = [r.family for r in ROWS]
    assert len(set(families)) == len(families), "a family has two rows"
    sources = {s.split("[")[0].split("::")[0] for s in WRITTEN}
    assert sources == set(FAMILY_LISTS) | {"test_video_capture"}  # that file: tests of one family each
    assert len(accounting()) >= 27 and len(cli()) >= 28
    arch = architectures()
    assert len(arch) >= 13 + 7 + 2 and {e.outcome for e in arch} == set(OUTCOMES)
    assert len(transformers_cases()) >= 8 and len(timm_cases()) >= 7
    missing = [ref for ref in FUNCTION_OUTCOMES if not defined(ref)]
    assert missing == [], f"FUNCTION_OUTCOMES names tests that do not exist: {missing}"
    # every kind of check has something to check
    assert {e.outcome for e in accounting()} == set(OUTCOMES)
    assert any(e.pool for e in accounting()) and any(e.skipped for e in accounting())
    assert any(e.reason for e in accounting()) and any(e.outcome == "one grid" for e in cli())


@pytest.mark.parametrize("row", ROWS, ids=[r.family for r in ROWS])
def test_every_row_says_what_its_tests_write_down(row):
    assert problems(row, WRITTEN) == []


def test_every_written_down_family_has_a_row():
    named = {ref for r in ROWS for ref in REF.findall(r.checked_by)}
    missing = sorted(set(WRITTEN) - named)
    assert missing == [], f"written down in the tests but in no row of {TABLE.name}: {missing}"


# -- the check itself: it fails where the table says more, or other, than the tests -----------------

BAD_ROWS = [
    (Row("ViT", "**refused**: no", "", "`test_capture_accounting[timm-vit]`"),
     "the table says refused, test_capture_accounting[timm-vit] writes down one grid"),
    (Row("XCiT", "**one grid**", "`cross-covariance attention`", "`test_capture_accounting[timm-xcit]`"),
     "the table says one grid, test_capture_accounting[timm-xcit] writes down refused"),
    (Row("Swin", "**one grid**: every map", "", "`test_families_cli[swin_tiny_patch4_window7_224]`"),
     "writes down stages"),
    (Row("EdgeNeXt", "**stages**", "", "`test_capture_architectures[edgenext_xx_small]`"),
     "writes down refused"),
    (Row("VideoMAE", "**refused**: later", "`attention over video tokens`", "`test_capture_accounting[hf-videomae]`"),
     "the table says refused, test_capture_accounting[hf-videomae] writes down one grid"),
    (Row("TimeSformer", "**one grid**", "`attention over video tokens`", "`test_capture_accounting[hf-timesformer]`"),
     "rec.skipped []"),
    (Row("TNT", "**one grid**", "", "`test_capture_accounting[timm-tnt]`"),
     "rec.skipped ['inner attention']"),
    (Row("VOLO", "**one grid**", "`outlook attention`", "`test_capture_accounting[timm-volo]`"),
     "does not say `rec.pool`"),
    (Row("DeiT3", "**one grid**", "`channel attention`", "`test_families_cli[deit3_small_patch16_224]`"),
     "which no test it names writes down"),
    (Row("Foo", "**one grid**", "", "`test_capture_accounting[no-such-family]`"), "which no test writes down"),
    (Row("Foo", "**one grid**", "", "by hand"), "names no test"),
    (Row("Foo", "every map", "", "`test_capture_accounting[timm-vit]`"), "does not start with one of"),
    (Row("ViT-MAE", "**stages**", "", "`test_capture_architectures::test_mae_visible_patches_placed_on_the_full_grid`"),
     "writes down one grid"),
]


@pytest.mark.parametrize("row,words", BAD_ROWS, ids=[f"{r.family}-{i}" for i, (r, _) in enumerate(BAD_ROWS)])
def test_a_row_that_says_other_than_its_tests_fails(row, words):
    found = problems(row, WRITTEN)
    assert any(words in p for p in found), found


def test_the_table_parser_reads_rows_only_under_the_family_header():
    text = "\n".join(["| model | x |", "|---|---|", "| a | b |", "",
                      "| " + " | ".join(HEADER) + " |", "|---|---|---|---|",
                      "| F | **one grid** |  | `test_capture_timm[flexivit_small]` |", "", "| g | h |"])
    assert table_rows(text) == [Row("F", "**one grid**", "", "`test_capture_timm[flexivit_small]`")]
