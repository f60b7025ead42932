import pytest
import torch

from svdtrain.recipes.models import MODELS, CifarResNet, build_model


@pytest.mark.parametrize("name, shape, classes", [
    ("resnet20", (2, 1, 28, 28), 10), ("resnet32", (1, 3, 32, 32), 100), ("resnet44", (1, 3, 32, 32), 10),
    ("resnet18", (1, 3, 64, 64), 7), ("lenet300", (2, 1, 28, 28), 10), ("lenet5", (2, 1, 28, 28), 10),
    ("lenet5", (2, 3, 32, 32), 10),
])
def test_models_run_on_their_data(name, shape, classes):
    model = build_model(name, classes, shape[1], shape[2]).eval()
    assert model(torch.randn(shape)).shape == (shape[0], classes)


def test_cifar_resnet_sizes():
    # He et al. 2016: ResNet-20 0.27 M, ResNet-56 0.85 M parameters (with projection shortcuts slightly more).
    assert 0.26e6 < sum(p.numel() for p in CifarResNet(20).parameters()) < 0.28e6
    assert 0.84e6 < sum(p.numel() for p in CifarResNet(56).parameters()) < 0.87e6
    bottleneck = CifarResNet(56, bottleneck=True)
    assert bottleneck.fc.in_features == 256 and len(bottleneck.layer1) == 6


def test_resnet50_has_the_usual_size():
    assert 25.5e6 < sum(p.numel() for p in build_model("resnet50", 1000, 3, 224).parameters()) < 25.6e6


def test_bad_depths_and_names():
    with pytest.raises(ValueError, match="6n \\+ 2"):
        CifarResNet(21)
    with pytest.raises(ValueError, match="9n \\+ 2"):
        CifarResNet(44, bottleneck=True)
    with pytest.raises(ValueError, match="allowed"):
        build_model("vgg16", 10, 3, 32)
    with pytest.raises(ValueError, match="12×12"):
        build_model("lenet5", 10, 1, 8)
    assert set(MODELS) >= {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "resnet18", "resnet34",
                           "resnet50", "lenet300", "lenet5"}
