import pytest
import torch

from svdtrain.recipes.models import MODELS, CifarResNet, build_model


@pytest.mark.parametrize("name, shape, classes", [
    ("resnet20", (2, 1, 28, 28), 10), ("resnet32", (1, 3, 32, 32), 100), ("resnet44", (1, 3, 32, 32), 10),
    ("resnet18", (1, 3, 64, 64), 7), ("lenet300", (2, 1, 28, 28), 10), ("lenet5", (2, 1, 28, 28), 10),
    ("lenet5", (2, 3, 32, 32), 10), ("mobilenetv2", (2, 1, 28, 28), 10), ("mobilenetv2", (1, 3, 32, 32), 100),
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


def test_mobilenetv2_has_the_papers_blocks_at_half_width():
    """17 inverted residuals (10 with the identity shortcut), depthwise 3×3 between pointwise 1×1 convs; SVD training
    factors the pointwise and dense convs and leaves the depthwise ones (nothing to factor), and filter pruning can
    remove their channels."""
    import svdtrain
    from svdtrain.recipes.models import InvertedResidual

    model = build_model("mobilenetv2", 10, 1, 28)
    blocks = [m for m in model.modules() if isinstance(m, InvertedResidual)]
    assert len(blocks) == 17 and sum(b.residual for b in blocks) == 10
    depthwise = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(m.groups == m.in_channels == m.out_channels for m in depthwise)
    assert model.fc.in_features == 640 and 0.55e6 < sum(p.numel() for p in model.parameters()) < 0.62e6
    report = svdtrain.decompose_(model, svdtrain.SVDConfig(exclude_modules=("fc",)))
    assert len(report.replaced) == 35 and {r["reason"] for r in report.skipped} >= {
        "depthwise convolution: one input channel per group, nothing to factor"}


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
                           "resnet50", "lenet300", "lenet5", "vit", "mobilenetv2"}


USER_MODEL = '''
from torch import nn
from helper_width import WIDTH  # a neighbour of the file: importable while it loads

def make(num_classes, in_channels, width=WIDTH, **ignored):
    return nn.Sequential(nn.Conv2d(in_channels, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))

def takes_nothing():
    return nn.Linear(3, 2)
'''


def test_a_model_from_a_file_gets_the_data_arguments_it_names(tmp_path):
    from svdtrain.recipes.models import resolve_reference

    (tmp_path / "helper_width.py").write_text("WIDTH = 5\n")
    (tmp_path / "net.py").write_text(USER_MODEL)
    ref = resolve_reference(str(tmp_path / "net.py") + ":make")
    model = build_model(ref, 7, 3, 16)
    assert model[0].out_channels == 5 and model[0].in_channels == 3 and model[-1].out_features == 7
    assert build_model(ref, 7, 3, 16, model_args={"width": 9})[0].out_channels == 9
    # image_size is not passed: `make` names only num_classes and in_channels (**ignored does not count).
    assert isinstance(build_model(f"{tmp_path / 'net.py'}:takes_nothing", 7, 3, 16), torch.nn.Linear)


def test_an_importable_model_and_relative_files(tmp_path, monkeypatch):
    from svdtrain.recipes.models import resolve_reference

    model = build_model("svdtrain.recipes.models:resnet20", 4, 1, 28)
    assert isinstance(model, CifarResNet) and model.fc.out_features == 4
    monkeypatch.chdir(tmp_path)
    assert resolve_reference("sub/net.py:make") == f"{tmp_path}/sub/net.py:make"
    assert resolve_reference("resnet20") == "resnet20" and resolve_reference("pkg.mod:make") == "pkg.mod:make"


@pytest.mark.parametrize("source, ref, args, message", [
    (None, "{dir}/missing.py:make", {}, "no file"),
    ("x = 1\n", "{dir}/net.py:make", {}, "has no 'make'"),
    ("make = 3\n", "{dir}/net.py:make", {}, "not a callable"),
    ("def make(): return 3\n", "{dir}/net.py:make", {}, "returned 'int'; allowed: a torch.nn.Module"),
    ("import nonexistent_package\n", "{dir}/net.py:make", {}, "ModuleNotFoundError"),
    ("def make(:\n", "{dir}/net.py:make", {}, "SyntaxError"),
    ("def make(num_classes): raise RuntimeError('boom')\n", "{dir}/net.py:make", {}, "RuntimeError: boom"),
    ("def make(num_classes): pass\n", "{dir}/net.py:make", {"num_classes": 3}, "which the data decides"),
    (None, "no_such_package.models:make", {}, "No module named 'no_such_package'"),
    (None, "resnet20", {"width": 3}, "model_args is for a model given by reference"),
])
def test_bad_model_references(tmp_path, source, ref, args, message):
    from svdtrain.recipes.models import ModelError

    if source is not None:
        (tmp_path / "net.py").write_text(source)
    with pytest.raises(ModelError, match=message) as error:
        build_model(ref.format(dir=tmp_path), 10, 1, 28, model_args=args)
    assert "\n" not in str(error.value)
