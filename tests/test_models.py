import pytest
import torch

from lightning_hessian.models import MNIST1DCNN, MNIST1DMLP, resnet18, resnet20


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def test_mnist1d_models_shapes_and_sizes():
    cnn = MNIST1DCNN()
    # conv 1->25 k5, 25->25 k3 (twice), linear 25*5 -> 10
    assert n_params(cnn) == (25 * 5 + 25) + 2 * (25 * 25 * 3 + 25) + (125 * 10 + 10)
    assert cnn(torch.randn(7, 40)).shape == (7, 10)
    assert torch.equal(cnn(torch.ones(2, 40)), cnn(torch.ones(2, 1, 40)))
    assert n_params(MNIST1DMLP()) == 40 * 100 + 100 + 100 * 100 + 100 + 100 * 10 + 10


# ResNet-18: the usual CIFAR variant; ResNet-20 with 1x1-conv shortcuts (option B)
@pytest.mark.parametrize("factory, expected", [(resnet20, 272_474), (resnet18, 11_173_962)])
def test_cifar_resnet_sizes(factory, expected):
    model = factory()
    assert n_params(model) == expected
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
