"""CPU latency and file size of integer-only models versus float, in torch and in onnxruntime.

For MNIST1DCNN (batch 256) and ResNet-20 (width 16, batch 32, 32x32 inputs), uniform 8-bit weights and
activations: the float model (BatchNorm folded, the fair deployment baseline), the ``IntegerModel``
(int8 GEMMs via ``torch._int_mm``), the integer ONNX export in onnxruntime, and the float model exported
to ONNX (TorchScript exporter) in onnxruntime. Medians over repeats, one thread everywhere, all in the
same run; ratios are ``integer / float`` latency (below 1: integer is faster). Weights are randomly
initialised (latency does not depend on their values); the integer logits are checked bit-identical
between torch and onnxruntime before timing.

Run: ``python benchmarks/integer_latency.py [--repeats 20]``; writes benchmarks/results/integer_latency.md.
"""

from __future__ import annotations

import argparse
import copy
import io
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from _common import command, machine, write_result

from lightning_hessian.models import MNIST1DCNN, resnet20
from lightning_hessian.quant.export import export_onnx
from lightning_hessian.quant.integer import to_integer_model
from lightning_hessian.quant.modules import calibrate, fold_batchnorm, quantize_model


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def _state_bytes(state: dict) -> int:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getbuffer().nbytes


def _session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def measure(name: str, model: torch.nn.Module, x: torch.Tensor, repeats: int, workdir: Path) -> dict:
    model.eval()
    float_model = copy.deepcopy(model)
    fold_batchnorm(float_model, x[:2])
    qmodel, _ = quantize_model(model, 8)
    calibrate(qmodel, [x])
    fold_batchnorm(qmodel, x[:2])
    integer = to_integer_model(qmodel, x[:8])
    int_onnx = export_onnx(integer, x[:8], workdir / f"{name}_int.onnx")
    float_onnx = workdir / f"{name}_float.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(float_model, (x[:8],), str(float_onnx), dynamo=False, input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}})
    int_session, float_session = _session(str(int_onnx)), _session(str(float_onnx))
    feed = {"input": x.numpy()}
    with torch.no_grad():
        int_out = integer(x)
        assert np.array_equal(int_session.run(None, feed)[0], int_out.numpy()), "onnxruntime != IntegerModel"
        top1 = float((int_out.argmax(1) == float_model(x).argmax(1)).float().mean())
        float_ms = _median_ms(lambda: float_model(x), repeats)
        int_ms = _median_ms(lambda: integer(x), repeats)
    ort_int_ms = _median_ms(lambda: int_session.run(None, feed), repeats)
    ort_float_ms = _median_ms(lambda: float_session.run(None, feed), repeats)
    q4, _ = quantize_model(model, 4)
    calibrate(q4, [x])
    fold_batchnorm(q4, x[:2])
    return {
        "model": name, "batch": len(x), "float_ms": float_ms, "int_ms": int_ms, "ort_float_ms": ort_float_ms,
        "ort_int_ms": ort_int_ms, "top1_vs_float": top1,
        "float_state": _state_bytes(float_model.state_dict()), "int_state": _state_bytes(integer.state_dict()),
        "packed8": integer.packed_size_bytes(), "packed4": to_integer_model(q4, x[:8]).packed_size_bytes(),
        "onnx_int": int_onnx.stat().st_size, "onnx_float": float_onnx.stat().st_size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cases = [("MNIST1DCNN", MNIST1DCNN(), torch.randn(256, 40)),
             ("ResNet-20", resnet20(width=16), torch.randn(32, 3, 32, 32))]
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(name, model, x, args.repeats, Path(tmp)) for name, model, x in cases]

    kb = lambda b: f"{b / 1024:.1f}"
    lines = [
        "# Integer-only inference: CPU latency and model size",
        "",
        f"Command: `{command()}`  ",
        f"Machine: {machine(f'onnxruntime {ort.__version__}')}; ORT intra/inter-op threads 1; median of "
        f"{args.repeats} runs.",
        "Uniform 8-bit weights and activations; float = BatchNorm-folded float32 model. "
        "Integer logits in onnxruntime are bit-identical to the torch IntegerModel (checked in the run).",
        "",
        "| model | batch | float torch (ms) | int torch (ms) | int/float torch | float ORT (ms) | int ORT (ms) "
        "| int/float ORT | top-1 int vs float |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['batch']} | {r['float_ms']:.2f} | {r['int_ms']:.2f} | "
                     f"{r['int_ms'] / r['float_ms']:.2f}x | {r['ort_float_ms']:.2f} | {r['ort_int_ms']:.2f} | "
                     f"{r['ort_int_ms'] / r['ort_float_ms']:.2f}x | {100 * r['top1_vs_float']:.1f}% |")
    lines += [
        "",
        "| model | float state_dict (KiB) | int state_dict (KiB) | int packed 8-bit (KiB) | int packed 4-bit (KiB) "
        "| int ONNX (KiB) | float ONNX (KiB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {kb(r['float_state'])} | {kb(r['int_state'])} | {kb(r['packed8'])} | "
                     f"{kb(r['packed4'])} | {kb(r['onnx_int'])} | {kb(r['onnx_float'])} |")
    lines += [
        "",
        "int state_dict: `torch.save` of the IntegerModel buffers (int8 weights, int32 biases and mantissas, "
        "int8 shifts); packed: weights at their bit width (two 4-bit codes per byte), the rest as deployed. "
        "Top-1 agreement: integer vs float model, random weights and random inputs (untrained models; accuracy "
        "of trained models is measured in the HAWQ table).",
    ]
    write_result("integer_latency", "\n".join(lines))


if __name__ == "__main__":
    main()
