"""HAWQModule's option groups: each checks its fields when built, the flat keywords and the groups build the same
module and plan, and a setting given both ways with different values is an error naming both."""

from __future__ import annotations

import inspect
import io
from functools import partial

import pytest
import torch

from lightning_hessian.quant import (
    FineTuneOptions,
    HAWQModule,
    ProbeOptions,
    QuantizationOptions,
    SensitivityOptions,
)
from lightning_hessian.quant.hawq_options import FLAT_KEYS, OPTION_GROUPS, check_combination, merge_options
from tests.helpers.modules import LAYERS, float_module, four_class_data
from tests.helpers.problems import fit_full_batch

BAD = [  # (group, field, value, error, message): the message names the field
    (ProbeOptions, "calibration", "noise", ValueError, "calibration must be one of"),
    (ProbeOptions, "probe_size", 0, ValueError, "probe_size must be a positive integer"),
    (ProbeOptions, "probe_batch_size", 2.5, ValueError, "probe_batch_size must be a positive integer"),
    (ProbeOptions, "seed", -1, ValueError, "seed must be an integer >= 0"),
    (ProbeOptions, "input_shape", (3, 0), ValueError, "input_shape must be positive ints"),
    (ProbeOptions, "distill", {"seed": 1}, ValueError, r"distill: \['seed'\] are set by HAWQModule"),
    (ProbeOptions, "distill", {"steps": 1}, ValueError, r"distill: unknown options \['steps'\]"),
    (ProbeOptions, "distill", [("lr", 1.0)], ValueError, "distill must be a mapping"),
    (SensitivityOptions, "metric", "diagonal", ValueError, "metric must be one of"),
    (SensitivityOptions, "trace_rel_tol", 0, ValueError, "trace_rel_tol must be a finite number > 0"),
    (SensitivityOptions, "max_samples", 20, ValueError, "max_samples=20 is below the 32"),
    (SensitivityOptions, "max_samples", True, ValueError, "max_samples must be a positive integer"),
    (QuantizationOptions, "bits", 9, ValueError, "bits=9 is outside the supported bit widths 2..8"),
    (QuantizationOptions, "bits", {"fc": 1}, ValueError, r"bits\['fc'\]=1 is outside"),
    (QuantizationOptions, "bits", "8", TypeError, "bits must be an int"),
    (QuantizationOptions, "budgets", {"latency": 0.5}, ValueError, "budgets: unknown resource 'latency'"),
    (QuantizationOptions, "budgets", {"size": -1}, ValueError, r"budgets\['size'\] must be a finite number >= 0"),
    (QuantizationOptions, "budgets", {}, ValueError, "budgets must be a non-empty mapping"),
    (QuantizationOptions, "bit_choices", (4, 16), ValueError, "bit_choices=16 is outside"),
    (QuantizationOptions, "bit_choices", (), ValueError, "bit_choices must hold at least one bit width"),
    (QuantizationOptions, "act_bits", 1, ValueError, "act_bits=1 is outside"),
    (QuantizationOptions, "act_bits", "weights", ValueError, "act_bits='weights' is not supported.*'follow'"),
    (QuantizationOptions, "ties", ["conv"], TypeError, "ties must be groups of layer names"),
    (QuantizationOptions, "ties", "conv", TypeError, "ties must be groups of layer names"),
    (QuantizationOptions, "solver", "glpk", ValueError, "solver='glpk' is not supported"),
    (QuantizationOptions, "momentum", 0.0, ValueError, r"momentum \(None: running min/max\) must be .* in \(0, 1\]"),
    (FineTuneOptions, "distill_weight", 2, ValueError, r"distill_weight \(0: no distillation\) .* in \[0, 1\]"),
    (FineTuneOptions, "distill_weight", True, ValueError, "distill_weight"),
    (FineTuneOptions, "temperature", 0, ValueError, "temperature must be a finite number > 0"),
]
GOOD = [  # (group, given, field, value after the check)
    (ProbeOptions, {"calibration": "distilled", "example_input": torch.zeros(2, 3, 8)}, "input_shape", (3, 8)),
    (ProbeOptions, {"input_shape": [40]}, "input_shape", (40,)),
    (ProbeOptions, {"distill": None}, "distill", {}),
    (ProbeOptions, {"distill": {"max_steps": 5}}, "distill", {"max_steps": 5}),
    (SensitivityOptions, {"trace_rel_tol": 1}, "trace_rel_tol", 1),  # as given: the sensitivity cache key reads it
    (SensitivityOptions, {"metric": "kl", "max_samples": 32}, "max_samples", 32),
    (QuantizationOptions, {"bits": {"fc": 4}}, "bits", {"fc": 4}),
    (QuantizationOptions, {"budgets": {"bops": 3}}, "budgets", {"bops": 3.0}),
    (QuantizationOptions, {"bit_choices": [8, 2, 8]}, "bit_choices", [2, 8]),
    (QuantizationOptions, {"act_bits": "follow"}, "act_bits", "follow"),
    (QuantizationOptions, {"ties": [["a", "b"]]}, "ties", [("a", "b")]),
    (QuantizationOptions, {"momentum": 1}, "momentum", 1),
    (FineTuneOptions, {"distill_weight": 1}, "distill_weight", 1.0),
]


@pytest.mark.parametrize("cls, field, value, error, match", BAD, ids=lambda v: getattr(v, "__name__", None))
def test_each_group_rejects_a_bad_value_naming_the_field(cls, field, value, error, match):
    with pytest.raises(error, match=match):
        cls(**{field: value})
    with pytest.raises(error, match=match):  # the same check, and message, through the flat keyword
        merge_options({field: value}, {})


@pytest.mark.parametrize("cls, given, field, expected", GOOD, ids=lambda v: getattr(v, "__name__", None))
def test_each_group_keeps_a_good_value_in_its_checked_form(cls, given, field, expected):
    value = getattr(cls(**given), field)
    assert value == expected and type(value) is type(expected)


def test_every_flat_keyword_is_one_field_of_one_group():
    assert len(FLAT_KEYS) == len(set(FLAT_KEYS)) == 25
    parameters = inspect.signature(HAWQModule.__init__).parameters
    assert set(parameters) == {"self", "module", "module_class", *OPTION_GROUPS, *FLAT_KEYS}
    assert all(parameters[name].default is None for name in (*OPTION_GROUPS, *FLAT_KEYS))  # None: not given


def test_checks_across_groups_and_within_one():
    with pytest.raises(ValueError, match=r"metric='quadratic\+act' .* needs act_bits='follow' \(got act_bits=8\)"):
        check_combination(SensitivityOptions(metric="quadratic+act"), QuantizationOptions())
    check_combination(SensitivityOptions(metric="quadratic+act"), QuantizationOptions(act_bits="follow"))
    with pytest.raises(ValueError, match="either bits= .* or budgets="):
        QuantizationOptions(bits=8, budgets={"size": 0.5})
    with pytest.raises(ValueError, match="calibration='distilled' needs the shape .* input_shape="):
        ProbeOptions(calibration="distilled", example_input=[0.0])


def test_a_setting_given_both_ways_must_agree():
    with pytest.raises(ValueError, match=r"metric='qbert' and sensitivity=SensitivityOptions\(\.\.\., metric='kl'\)"):
        merge_options({"metric": "qbert"}, {"sensitivity": SensitivityOptions(metric="kl")})
    with pytest.raises(ValueError, match=r"bit_choices=\(2, 8\) and quantization=QuantizationOptions.*\[4, 8\]"):
        merge_options({"bit_choices": (2, 8)}, {"quantization": QuantizationOptions()})
    with pytest.raises(ValueError, match="either bits= .* or budgets="):  # a flat key beside its group, checked as one
        merge_options({"bits": 8}, {"quantization": QuantizationOptions(budgets={"size": 0.5})})
    with pytest.raises(TypeError, match="sensitivity must be a SensitivityOptions .*, got dict"):
        merge_options({}, {"sensitivity": {"metric": "kl"}})
    with pytest.raises(ValueError, match=r"temperature=2 and finetune=.*temperature=1.0\)"):  # the group's default
        merge_options({"temperature": 2}, {"finetune": FineTuneOptions(distill_weight=0.5)})
    agreed = merge_options({"bit_choices": [8, 4], "probe_size": None, "temperature": 1},
                           {"quantization": QuantizationOptions(bit_choices=(4, 8), budgets={"size": 0.5}),
                            "finetune": FineTuneOptions(distill_weight=0.5)})
    assert agreed["quantization"] == QuantizationOptions(bit_choices=(4, 8), budgets={"size": 0.5})
    assert agreed["finetune"] == FineTuneOptions(distill_weight=0.5)
    assert agreed["probe"] == ProbeOptions()  # None: not given


def test_flat_keywords_and_groups_build_the_same_module_and_plan(tmp_path):
    trained = fit_full_batch(float_module(), *four_class_data(), steps=100)
    x, y = four_class_data(96)
    probe, example = [(x[:48], y[:48]), (x[48:], y[48:])], x[:2]
    optimizer = partial(torch.optim.SGD, lr=0.01)
    flat = dict(
        probe_data=probe, probe_size=96, probe_batch_size=48, seed=3, example_input=example,
        metric="quadratic", trace_rel_tol=0.1, max_samples=64, cache_dir=tmp_path,
        budgets={"size": 0.5, "bops": 0.7}, bit_choices=(2, 4, 8), act_bits=8, ties=[(LAYERS[1], LAYERS[2])],
        solver="cp-sat", groups={"rows": 2}, momentum=0.1, report_dir=tmp_path / "report",
        optimizer=optimizer, distill_weight=0.25, temperature=2.0,
    )
    grouped = dict(
        probe=ProbeOptions(probe_data=probe, probe_size=96, probe_batch_size=48, seed=3, example_input=example),
        sensitivity=SensitivityOptions(metric="quadratic", trace_rel_tol=0.1, max_samples=64, cache_dir=tmp_path),
        quantization=QuantizationOptions(budgets={"size": 0.5, "bops": 0.7}, bit_choices=(2, 4, 8), act_bits=8,
                                         ties=[(LAYERS[1], LAYERS[2])], solver="cp-sat", groups={"rows": 2},
                                         momentum=0.1, report_dir=tmp_path / "report"),
        finetune=FineTuneOptions(optimizer=optimizer, distill_weight=0.25, temperature=2.0),
    )
    a, b = HAWQModule(trained, **flat), HAWQModule(trained, **grouped)
    assert dict(a.hparams) == dict(b.hparams) and a.hparams["ties"] == [[LAYERS[1], LAYERS[2]]]
    buffer = io.BytesIO()  # what a checkpoint holds of the groups: primitives only
    torch.save({"hparams": dict(b.hparams), "state_dict": b.state_dict()}, buffer)
    assert torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)["hparams"] == dict(a.hparams)
    for name in ("probe_data", "probe_size", "probe_batch_size", "seed", "example_input", "metric", "trace_rel_tol",
                 "max_samples", "cache_dir", "budgets", "bit_choices", "act_bits", "ties", "solver", "weight_groups",
                 "momentum", "report_dir", "optimizer_factory", "distill_weight", "temperature", "calibration",
                 "input_shape", "distill_options", "fixed_bits", "loss_fn"):
        assert getattr(a, name) is getattr(b, name) or getattr(a, name) == getattr(b, name), name
    bits = a.plan(probe)
    assert b.plan(probe) == bits and b.sensitivity.cached  # the same plan, from the same cached measurement
    assert b.sensitivity.omega("quadratic") == a.sensitivity.omega("quadratic")
    assert bits[LAYERS[1]] == bits[LAYERS[2]] and len(set(bits.values())) > 1


def test_hawq_module_rejects_a_setting_given_both_ways():
    module = float_module()
    with pytest.raises(ValueError, match=r"metric='kl' and sensitivity=SensitivityOptions\(\.\.\., metric='qbert'\)"):
        HAWQModule(module, bits=8, metric="kl", sensitivity=SensitivityOptions(metric="qbert"))
    hawq = HAWQModule(module, metric="kl", sensitivity=SensitivityOptions(metric="kl"),
                      quantization=QuantizationOptions(bits={LAYERS[0]: 4}))
    assert hawq.metric == "kl" and hawq.fixed_bits == {LAYERS[0]: 4} and hawq.hparams["bits"] == {LAYERS[0]: 4}
    with pytest.raises(ValueError, match=r"bits names unknown layers \['fc'\]"):  # the module's own checks still run
        HAWQModule(module, quantization=QuantizationOptions(bits={"fc": 4}))
    with pytest.raises(ValueError, match="metric='quadratic\\+act' .* needs act_bits='follow'"):
        HAWQModule(module, sensitivity=SensitivityOptions(metric="quadratic+act"), budgets={"size": 0.5})
