"""int8 inference latency in onnxruntime: our exported model beside float and beside onnxruntime's own int8.

Two trained models: the MNIST-1D CNN (``MNIST1DCNN(channels=25)``, 4000/1000 split) and a CIFAR-style
ResNet-20 (``resnet20(width=16)``, 32x32 inputs) on the generated 32x32 task of ``hawq_table.py`` (no
CIFAR-10 copy offline), each quantized two ways: uniform W8A8 (post-training, calibrated on training
batches) and the HAWQ mixed 4/8-bit plan (trace sensitivity, size budget 0.5, activations following the
weights as in ``hawq_table.py``), fine-tuned one epoch quantization-aware with ``hawq_table.py``'s
fine-tune optimizer (learning rate 1/100 of the training one).

Per model, configuration and batch size (1 and 32), one onnxruntime session each, one thread, sessions
timed interleaved (round robin, median of repeats): the BatchNorm-folded float model (TorchScript
exporter), onnxruntime's own static int8 quantization of it (``quantize_static``, per-channel int8
weights, uint8 activations, MinMax calibration on the same batches, QDQ and QOperator formats; always
8-bit: it has no 4-bit kernels), and our ``export_onnx`` of the ``IntegerModel``. "bit-exact": onnxruntime's
logits equal the torch ``IntegerModel``'s on the whole test set. Top-1 agreement is with the float
model on the test set. The torch ``IntegerModel`` (the reference of the deployed arithmetic, not a fast
path) is timed beside float torch.

Run: ``python benchmarks/integer_latency.py [--repeats 50] [--quick]``; writes benchmarks/results/integer_latency.md.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from _common import command, machine, markdown_table, write_result
from hawq_table import synthetic_images
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

from lightning_hessian.data.mnist1d import load_mnist1d
from lightning_hessian.models import MNIST1DCNN, resnet20
from lightning_hessian.quant.allocation import allocate_bits
from lightning_hessian.quant.costs import budget_between, layer_stats, size_costs
from lightning_hessian.quant.export import export_onnx
from lightning_hessian.quant.integer import ConvStep, LinearStep, to_integer_model
from lightning_hessian.quant.modules import calibrate, fold_batchnorm, quantize_model
from lightning_hessian.quant.sensitivity import layer_sensitivity

BATCHES = (1, 32)


def integer_layers(integer) -> set[int]:
    """The distinct conv/linear layers (weights) of an ``IntegerModel``."""
    return {step.weight.data_ptr() for step in integer.steps if isinstance(step, (ConvStep, LinearStep))}


def train(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, optimizer, batch: int = 64) -> None:
    """Plain minibatch training with a fixed seed (cross-entropy, cosine learning rate over the epochs)."""
    torch.manual_seed(0)
    opt = optimizer(model.parameters())
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
        schedule.step()
    model.eval()


def mixed_plan(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, int]:
    """HAWQ's 4/8 plan at half the size budget: Hutchinson traces on 256 training samples, exact allocation."""
    probe = [(x[i:i + 64], y[i:i + 64]) for i in range(0, 256, 64)]
    sens = layer_sensitivity(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), probe, bit_choices=(4, 8),
                             max_samples=64, rel_tol=0.1)
    costs = {"size": size_costs(layer_stats(model, x[:2]), (4, 8))}
    return allocate_bits(sens.omega("trace"), costs, {"size": budget_between(costs["size"], 0.5)})


class _Reader(CalibrationDataReader):
    def __init__(self, batches: list[torch.Tensor]):
        self.batches = iter([{"input": b.numpy()} for b in batches])

    def get_next(self):
        return next(self.batches, None)


def session(path: Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def interleaved_ms(fns: dict[str, callable], repeats: int) -> dict[str, float]:
    """Median milliseconds of each function, timed round robin so load changes hit all alike."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: 1e3 * statistics.median(v) for k, v in times.items()}


def measure(name: str, model: torch.nn.Module, data, bits, finetune, repeats: int, workdir: Path) -> list[dict]:
    """Quantize ``model`` (8 or a plan, fine-tuned with ``finetune``), export ours, the float model and
    onnxruntime's int8; time them."""
    x, y, xt, yt = data
    calib = [x[i:i + 64] for i in range(0, 512, 64)]
    qmodel, _ = quantize_model(model, bits, act_bits=8 if bits == 8 else "follow")
    calibrate(qmodel, calib)
    if bits != 8:  # W4A4 layers: one epoch of quantization-aware fine-tuning, as HAWQ does
        train(qmodel, x, y, 1, finetune)
    float_model = copy.deepcopy(model).eval()
    fold_batchnorm(float_model, x[:2])
    fold_batchnorm(qmodel, x[:2])
    integer = to_integer_model(qmodel.eval(), x[:8])
    tag = f"{name}_{'w8a8' if bits == 8 else 'mixed'}".replace("-", "")
    ours = export_onnx(integer, x[:8], workdir / f"{tag}_ours.onnx")
    float_path = workdir / f"{tag}_float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(float_model, (x[:8],), str(float_path), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    pre = workdir / f"{tag}_pre.onnx"
    quant_pre_process(str(float_path), str(pre))
    own = {}
    for fmt in (QuantFormat.QDQ, QuantFormat.QOperator):
        own[fmt.name] = workdir / f"{tag}_{fmt.name}.onnx"
        quantize_static(str(pre), str(own[fmt.name]), _Reader(calib), quant_format=fmt, per_channel=True,
                        weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    sessions = {"float": session(float_path), "QDQ": session(own["QDQ"]), "QOperator": session(own["QOperator"]),
                "ours": session(ours)}
    with torch.no_grad():
        int_logits, float_logits = integer(xt), float_model(xt)
    test = {"input": xt.numpy()}
    ours_logits = sessions["ours"].run(None, test)[0]
    top1 = {k: float((torch.from_numpy(s.run(None, test)[0]).argmax(1) == float_logits.argmax(1)).float().mean())
            for k, s in sessions.items() if k != "float"}
    common = {
        "model": name, "bits": "W8A8" if bits == 8 else "HAWQ 4/8 (size 0.5)",
        "exact": bool(np.array_equal(ours_logits, int_logits.numpy())),
        "acc_float": float((float_logits.argmax(1) == yt).float().mean()),
        "acc_ours": float((torch.from_numpy(ours_logits).argmax(1) == yt).float().mean()), "top1": top1,
        "sizes": {"float": float_path.stat().st_size, "QDQ": own["QDQ"].stat().st_size,
                  "QOperator": own["QOperator"].stat().st_size, "ours": ours.stat().st_size,
                  "packed": integer.packed_size_bytes()},
        "four_bit": [n for n, b in bits.items() if b == 4] if isinstance(bits, dict) else [],
        "layers": len(integer_layers(integer)),
    }
    rows = []
    for batch in BATCHES:
        feed = {"input": xt[:batch].numpy()}
        fns = {k: partial(s.run, None, feed) for k, s in sessions.items()}
        with torch.no_grad():
            fns["float torch"] = partial(float_model, xt[:batch])
            fns["int torch"] = partial(integer, xt[:batch])
            ms = interleaved_ms(fns, repeats * (4 if batch == 1 else 1))
        rows.append({**common, "batch": batch, "ms": ms})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per session (x4 at batch 1)")
    parser.add_argument("--quick", action="store_true", help="fewer training epochs (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    began = time.perf_counter()

    data_dir = Path(__file__).resolve().parents[1] / "data"
    mnist = load_mnist1d(4000, 1000, data_dir=data_dir)
    torch.manual_seed(0)
    cnn = MNIST1DCNN(channels=25)
    train(cnn, mnist[0], mnist[1], 3 if args.quick else 20, partial(torch.optim.Adam, lr=1e-2))
    images = (*synthetic_images(2000, seed=0), *synthetic_images(1000, seed=1))
    torch.manual_seed(0)
    resnet = resnet20(width=16)
    train(resnet, images[0], images[1], 1 if args.quick else 5,
          partial(torch.optim.SGD, lr=0.05, momentum=0.9, weight_decay=5e-4))
    finetunes = {"MNIST-1D CNN": partial(torch.optim.Adam, lr=1e-4),
                 "ResNet-20": partial(torch.optim.SGD, lr=5e-4, momentum=0.9)}

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, data in (("MNIST-1D CNN", cnn, mnist), ("ResNet-20", resnet, images)):
            plan = mixed_plan(model, data[0], data[1])
            for bits in (8, plan):
                rows += measure(name, model, data, bits, finetunes[name], args.repeats, Path(tmp))

    table = []
    for r in rows:
        ms = r["ms"]
        own = min(ms["QDQ"], ms["QOperator"])
        table.append([r["model"], r["bits"], str(r["batch"]), f"{ms['float']:.3f}", f"{ms['QDQ']:.3f}",
                      f"{ms['QOperator']:.3f}", f"{ms['ours']:.3f}", f"**{ms['ours'] / ms['float']:.2f}x**",
                      f"{ms['ours'] / own:.2f}x", "yes" if r["exact"] else "NO",
                      f"{100 * r['top1']['ours']:.1f}%", f"{100 * r['top1']['QDQ']:.1f}%",
                      f"{ms['float torch']:.3f}", f"{ms['int torch']:.3f}"])
    header = ["model", "weights/acts", "batch", "float ORT (ms)", "own int8 QDQ (ms)", "own int8 QOperator (ms)",
              "ours (ms)", "ours/float", "ours/own int8", "bit-exact", "top-1 = float (ours)",
              "top-1 = float (own QDQ)", "float torch (ms)", "IntegerModel torch (ms)"]
    kib = lambda b: f"{b / 1024:.1f}"
    seen, size_rows = set(), []
    for r in rows:
        if (r["model"], r["bits"]) in seen:
            continue
        seen.add((r["model"], r["bits"]))
        s = r["sizes"]
        four = ", ".join(r["four_bit"]) if r["four_bit"] else "none"
        size_rows.append([r["model"], r["bits"], f"{four} ({len(r['four_bit'])} of {r['layers']})",
                          f"{100 * r['acc_float']:.1f}%", f"{100 * r['acc_ours']:.1f}%", kib(s["float"]),
                          kib(s["QDQ"]), kib(s["QOperator"]), kib(s["ours"]), kib(s["packed"])])
    size_header = ["model", "weights/acts", "layers at 4 bits", "test acc. float", "test acc. ours",
                   "float ONNX (KiB)", "own QDQ ONNX (KiB)", "own QOperator ONNX (KiB)", "ours ONNX (KiB)",
                   "ours packed (KiB)"]
    lines = [
        "# int8 inference: onnxruntime latency beside float and onnxruntime's own int8", "",
        f"Command: `{command()}`  ",
        f"Machine: {machine(f'onnxruntime {ort.__version__}')}; onnxruntime intra/inter-op threads 1, default "
        f"graph optimizations; sessions timed interleaved, median of {args.repeats} runs ({4 * args.repeats} at "
        f"batch 1); total wall time {time.perf_counter() - began:.0f} s.", "",
        "\n\n".join(__doc__.split("\n\n")[1:3]), "",
        markdown_table(header, table), "",
        "ours/own int8: against the faster of onnxruntime's QDQ and QOperator models (8-bit everywhere). Top-1: "
        "share of test inputs whose argmax equals the float model's.", "",
        markdown_table(size_header, size_rows), "",
        "Sizes: ONNX files as saved; ours stores weights of 4 bits or fewer packed as INT4 (cast to int8 once "
        "at session start). \"ours packed\": weights at their bit width, int32 biases, float32 scales "
        "(``IntegerModel.packed_size_bytes``).",
    ]
    write_result("integer_latency", "\n".join(lines))


if __name__ == "__main__":
    main()
