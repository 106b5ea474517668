"""The vLLM plugin's option checks, which need no vLLM (the plugin itself: python_tests_vllm/)."""
from types import SimpleNamespace

import pytest

from vtkernels.vllm import ARCHITECTURES, PruningOptions, parse_options


def cfg(pruning):
    return SimpleNamespace(vtk_pruning=pruning) if pruning is not None else SimpleNamespace()


def test_defaults_and_values():
    assert parse_options(cfg({"method": "vispruner", "keep": 64}), "A", 576) == PruningOptions(
        "vispruner", 64, 0.5, 8)
    assert parse_options(cfg({"method": "vispruner", "keep": 3, "important_ratio": 1, "dedup_step": 2}),
                         "A") == PruningOptions("vispruner", 3, 1.0, 2)
    assert parse_options(cfg({"method": "fopru_row", "keep": 576}), "A", 576).keep == 576
    assert parse_options(cfg({"method": "fopru_rank", "keep": 10 ** 6}), "A").keep == 10 ** 6  # no bound


@pytest.mark.parametrize("pruning,message", [
    (None, r'needs the pruning method in the model config: pass hf_overrides=\{"architectures": \["A"\]'),
    ("vispruner", "must be a dict"),
    ({"keep": 4}, "needs a 'method'"),
    ({"method": "prumerge"}, "before the vision tower runs"),
    ({"method": "prumerge_plus"}, "fixed-budget method"),
    ({"method": "glimpse"}, "run 'glimpse' with vtkernels.hf"),
    ({"method": "topk", "keep": 4}, "unknown method 'topk'; choose one of fopru_rank, fopru_row, vispruner"),
    ({"method": "fopru_rank"}, r"needs 'keep' \(visual tokens kept per image, 1\.\.576\)"),
    ({"method": "fopru_rank", "keep": 577}, r"'keep'=577 must be in 1\.\.576: each image has 576"),
    ({"method": "fopru_rank", "keep": 0}, r"'keep'=0 must be in 1\.\.576"),
    ({"method": "fopru_rank", "keep": True}, "'keep' must be an int"),
    ({"method": "fopru_rank", "keep": "8"}, "'keep' must be an int"),
    ({"method": "vispruner", "keep": 8, "important_ratio": -0.1}, "important_ratio"),
    ({"method": "vispruner", "keep": 8, "dedup_step": 1.5}, "dedup_step"),
    ({"method": "fopru_row", "keep": 8, "dedup_step": 2}, r"takes options \['keep'\], got unknown \['dedup_step'\]"),
])
def test_bad_options_name_the_problem(pruning, message):
    with pytest.raises(ValueError, match=message):
        parse_options(cfg(pruning), "A", 576)


def test_architectures_are_lazy_strings():
    assert set(ARCHITECTURES) == {"VtkLlavaForConditionalGeneration", "VtkQwen2_5_VLForConditionalGeneration"}
    for target in ARCHITECTURES.values():
        module, cls = target.split(":")
        assert module.startswith("vtkernels.vllm.") and cls.startswith("Vtk")
