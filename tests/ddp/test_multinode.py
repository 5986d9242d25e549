"""Two "nodes" on loopback: two torchrun agents meet by c10d rendezvous and run the train recipe together."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.ddp, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_torchrun_on_loopback_trains_the_recipe_with_the_hessian_callbacks(tmp_path, data_dir):
    rdzv_id = f"lh-{uuid.uuid4().hex[:8]}"
    dump = tmp_path / "ranks"
    recipe = [
        str(ROOT / "recipes" / "train.py"), "trainer=multinode", "callbacks=abs",
        "data.num_train=400", "data.num_test=100", "data.batch_size=50", "trainer.max_epochs=2",
        "callbacks.hessian_spectrum.probe_size=100", "callbacks.hessian_spectrum.top_k=2",
        "callbacks.hessian_spectrum.max_overhead=null",
        "callbacks.adaptive_batch_size.probe_size=100", "callbacks.adaptive_batch_size.max_batch_size=200",
        "callbacks.adaptive_batch_size.duration=1",
        f"paths.root_dir={tmp_path}", f"paths.data_dir={data_dir}",
        "+callbacks.dump._target_=tests.recipe_callbacks.DumpRankState", f"+callbacks.dump.dirpath={dump}",
    ]
    torchrun = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}", f"--rdzv-id={rdzv_id}", "--max-restarts=0",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("LH_RUN_ID", None)
    nodes = [subprocess.Popen([*torchrun, *recipe], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        logs = [node.communicate(timeout=300)[0] for node in nodes]
    except subprocess.TimeoutExpired:
        for node in nodes:
            node.kill()
        logs = [node.communicate()[0] for node in nodes]
        pytest.fail("the two nodes did not finish in 300 s:\n" + "\n=====\n".join(log[-3000:] for log in logs))
    finally:
        for node in nodes:
            node.kill()
    assert [node.returncode for node in nodes] == [0, 0], "\n=====\n".join(log[-3000:] for log in logs)

    runs = tmp_path / "logs" / "train" / "runs"
    assert [p.name for p in runs.iterdir()] == [f"torchrun-{rdzv_id}"]  # one output directory for both nodes
    out = runs / f"torchrun-{rdzv_id}"
    assert (out / "checkpoints" / "last.ckpt").exists() and (out / "csv" / "metrics.csv").exists()

    states = [torch.load(dump / f"rank_{rank}.pt", weights_only=True) for rank in (0, 1)]
    assert sorted(s["node_rank"] for s in states) == [0, 1]
    assert all(s["num_nodes"] == 2 and s["world_size"] == 2 and s["output_dir"] == str(out) for s in states)
    # the callbacks decided the same on both nodes: eigenvalues (all-reduced HVPs) and the batch growth
    assert states[0]["spectrum"] == states[1]["spectrum"] and len(states[0]["spectrum"]) == 2
    # the batch each epoch trained at: duration=1 grows after every epoch (the authors' count), up to the cap 200
    assert states[0]["batch_sizes"] == states[1]["batch_sizes"] == [100, 200]
    assert states[0]["next_batch_size"] == states[1]["next_batch_size"] == 200
    for name, value in states[0]["params"].items():
        assert torch.equal(value, states[1]["params"][name]), name
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for name, value in states[0]["params"].items():
        assert torch.equal(value, last[name]), name
