import pytest
import torch

from lightning_hessian import recipes
from tests.helpers.config import compose_config

pytestmark = pytest.mark.ddp


def test_two_process_fit_of_the_demo_model(tmp_path, data_dir):
    overrides = [
        "trainer=ddp_sim", "trainer.max_epochs=3", "trainer.check_val_every_n_epoch=1",
        "data.num_train=400", "data.num_test=100", "data.batch_size=25",
    ]
    cfg = compose_config("train", overrides, tmp_path, data_dir)
    metrics = recipes.train(cfg)
    assert metrics["test/acc"] > 0.25
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    # 400 samples over 2 ranks at 25 per rank-batch: 8 optimizer steps per epoch
    assert ckpt["global_step"] == 3 * 8
