"""A real non-editable ``pip install .`` finds the packaged Hydra config from any directory."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_wheel_install_runs_lh_train_elsewhere(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()
    # reuse this environment's dependencies; build and install the project itself for real
    (Path(site) / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(ROOT)],
        check=True, capture_output=True,
    )
    (wheel,) = wheels.glob("lightning_hessian-*.whl")
    install = [str(python), "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)]
    subprocess.run(install, check=True, capture_output=True)
    workdir = tmp_path / "elsewhere"
    workdir.mkdir()
    result = subprocess.run(
        [str(venv / "bin" / "lh-train"), "trainer.max_epochs=1", "data.num_train=400", "data.num_test=100"],
        cwd=workdir, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "test/acc" in result.stdout
    located = subprocess.run(
        [str(python), "-c", "import lightning_hessian.conf as c; print(c.__file__)"],
        cwd=workdir, capture_output=True, text=True, check=True,
    ).stdout
    assert str(venv) in located  # the installed copy, not the source tree
    assert list((workdir / "logs" / "train" / "runs").glob("*/checkpoints/last.ckpt"))
