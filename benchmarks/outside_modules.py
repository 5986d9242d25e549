"""The three callbacks and HAWQModule on modules written the way other projects write them (tests/foreign).

For each module and feature: what happens at the defaults, with no argument beyond the required ones (it runs,
or it stops before training with one line naming what to pass), and the overhead once the user passes what that
line asks for (a ``loss_fn``, an ``example_input``, ``mode="accumulate"``): the wall time of ``fit`` with the
callback (or of fitting the ``HAWQModule``) over the same fit without, both in the same round, rounds interleaved,
the median ratio reported. The modules: a classifier with BatchNorm (lightning-hydra-template style), a regression
written against ``pytorch_lightning``, a BERT-like transformer with dict batches (HuggingFace style), a GAN with
manual optimization (Lightning's example style); ``--all`` adds the BoringModel, the language model without
``forward``, the LightningCLI autoencoder and classifier.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _common import command, machine, markdown_table, write_result

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/foreign: the outside-style modules

from lightning_hessian import (  # noqa: E402
    AdaptiveBatchSizeCallback,
    AdversarialAugmentCallback,
    HAWQModule,
    HessianSpectrumCallback,
)
from tests.foreign import bert_like, gan, hydra_template, pl_regression  # noqa: E402
from tests.foreign.cases import CASES, Case  # noqa: E402

FEATURES = ("HessianSpectrumCallback", "AdaptiveBatchSizeCallback", "AdversarialAugmentCallback", "HAWQModule")
REQUIRED = ("hydra_mnist", "pl_regression", "bert_like", "gan")
TRAINER = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
               enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0,
               default_root_dir=tempfile.mkdtemp(prefix="outside_modules_"))  # HAWQ's reports, not in the checkout


def benchmark_data(case: Case, samples: int) -> Callable[[], dict[str, Any]]:
    """The case's data with ``samples`` training samples (the tests' sets are tiny)."""
    if case.name == "hydra_mnist":
        return lambda: {"datamodule": hydra_template.MNISTDataModule(train_val_test_split=(samples, 64, 64))}
    if case.name == "pl_regression":
        return lambda: {"datamodule": pl_regression.RegressionData(num_samples=samples)}
    if case.name == "bert_like":
        return lambda: {"datamodule": bert_like.GLUEDataModule(num_samples=samples)}
    if case.name == "gan":
        return lambda: {"train_dataloaders": torch.utils.data.DataLoader(gan.gan_data(samples), 32, shuffle=True)}
    return case.data


def build(case: Case, feature: str, passed: dict[str, Any]) -> tuple[list[Any], Any]:
    """The callbacks and the module to fit for ``feature``, with ``passed`` on top of the defaults."""
    module = case.module()
    if feature == "HessianSpectrumCallback":
        return [HessianSpectrumCallback(plot=False, **passed)], module
    if feature == "AdaptiveBatchSizeCallback":
        return [AdaptiveBatchSizeCallback(case.max_batch_size, plot=False, **passed)], module
    if feature == "AdversarialAugmentCallback":
        return [AdversarialAugmentCallback(**passed)], module
    return [], HAWQModule(module, budgets={"size": 0.5}, **passed)


def what_to_pass(case: Case, feature: str) -> dict[str, Any] | None:
    """What the one-line error at the defaults asks for; None where only a module-specific callable would do (an
    attack on a module without class logits)."""
    if feature == "AdversarialAugmentCallback" and not case.default_loss_applies:
        return None
    loss = {} if case.default_loss_applies else {"loss_fn": case.loss_fn}
    if feature == "AdaptiveBatchSizeCallback":
        return {**loss, "mode": case.abs_mode} if case.abs_mode != "dataloader" else loss
    if feature == "HAWQModule" and case.example_input is not None:
        return {**loss, "example_input": case.example_input()}
    if feature == "AdversarialAugmentCallback":
        return {}
    return loss


def fit(case: Case, data: Callable[[], dict[str, Any]], epochs: int, feature: str | None,
        passed: dict[str, Any], **trainer: Any) -> tuple[tuple[float, float], list[Any], Any]:
    """Fit once; return (wall, CPU) seconds, the callbacks and the module."""
    torch.manual_seed(0)
    callbacks, module = build(case, feature, passed) if feature else ([], case.module())
    start, cpu = time.perf_counter(), time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        case.trainer(max_epochs=epochs, callbacks=callbacks, **TRAINER, **trainer).fit(module, **data())
    return (time.perf_counter() - start, time.process_time() - cpu), callbacks, module


def at_defaults(case: Case, feature: str, data: Callable[[], dict[str, Any]]) -> str:
    try:
        fit(case, data, 1, feature, {}, limit_train_batches=2)
    except Exception as err:  # the point: which combinations stop, and with what line
        text = str(err)
        return f"clear error: {text[:110]}{'...' if len(text) > 110 else ''}" if "\n" not in text else \
            f"unclear error ({type(err).__name__}, several lines)"
    return "ran"


def hessian_work(feature: str, callbacks: list[Any], module: Any) -> str:
    if feature == "HessianSpectrumCallback":
        history, skipped = callbacks[0].history, callbacks[0].skipped
        each = f" of {statistics.mean(h['hvps'] for h in history):.0f} HVPs" if history else ""
        return f"{len(history)} probes{each}, {skipped} skipped (budget)"
    if feature == "AdaptiveBatchSizeCallback":
        history = callbacks[0].history
        return f"batch {history[0]['batch_size']} -> {history[-1]['batch_size']}"
    if feature == "HAWQModule" and module.sensitivity is not None:
        return f"{module.sensitivity.num_samples} Hutchinson probes"
    if feature == "AdversarialAugmentCallback":
        return f"{callbacks[0].samples_attacked} samples attacked"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--samples", type=int, default=1024, help="training samples per module")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--all", action="store_true", help="all eight outside-style modules, not the four")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cases = [CASES[name] for name in (CASES if args.all else REQUIRED)]
    data = {case.name: benchmark_data(case, args.samples) for case in cases}
    defaults = {(case.name, f): at_defaults(case, f, data[case.name]) for case in cases for f in FEATURES}
    ratios: dict[tuple[str, str], list[tuple[float, float]]] = {}  # (wall, CPU) over the plain fit's
    work: dict[tuple[str, str], str] = {}
    failed: dict[tuple[str, str], str] = {}
    for _ in range(args.repeats):
        for case in cases:
            plain, _, _ = fit(case, data[case.name], args.epochs, None, {})
            for feature in FEATURES:
                key, passed = (case.name, feature), what_to_pass(case, feature)
                if key in failed or passed is None:
                    continue
                try:
                    seconds, callbacks, module = fit(case, data[case.name], args.epochs, feature, passed)
                except Exception as err:  # a combination that cannot run even with what it asks for
                    failed[key] = f"{type(err).__name__}: {str(err).splitlines()[0][:110]}"
                    continue
                ratios.setdefault(key, []).append((seconds[0] / plain[0], seconds[1] / plain[1]))
                work[key] = hessian_work(feature, callbacks, module)
    rows = []
    for case in cases:
        for feature in FEATURES:
            key = (case.name, feature)
            passed = what_to_pass(case, feature)
            if passed is None:
                told, overhead, cpu = "attack=<callable (model, x, y) -> x_adv>", "n/a (no class logits to attack)", ""
            else:
                told = ", ".join(k if k != "mode" else "mode='accumulate'" for k in passed) or "(nothing)"
                overhead = f"{statistics.median(r[0] for r in ratios[key]):.2f}x" if key in ratios else \
                    f"n/a: {failed[key]}"
                cpu = f"{statistics.median(r[1] for r in ratios[key]):.2f}x" if key in ratios else ""
            rows.append([case.name, feature, defaults[key], told, overhead, cpu, work.get(key, "")])
    text = "\n".join([
        "# Outside-style modules: what runs at the defaults, and the overhead once it runs",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine()}  ",
        f"Modules from tests/foreign ({args.samples} training samples each, {args.epochs} epochs); 'at defaults': "
        "one short fit with no argument beyond the required ones (max_batch_size for ABS, budgets for HAWQ); "
        "'overhead': median over "
        f"{args.repeats} interleaved rounds of the fit's wall time (and of this process's CPU time, steadier on "
        "a shared machine) with the feature (given what its error asked for) over the same fit without it, "
        "measured in the same round. HAWQModule's overhead includes planning and fine-tuning the quantized copy.",
        "",
        markdown_table(["module", "feature", "at defaults", "user passes", "overhead (fit with / without)",
                        "CPU with / without", "Hessian work"], rows),
    ])
    write_result("outside_modules", text)


if __name__ == "__main__":
    main()
