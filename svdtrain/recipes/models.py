"""The tool's models: reference models by name (MODELS[name](num_classes, in_channels, image_size, bottleneck)),
or the user's own, by reference to a callable (`package.module:make` or `path/to/file.py:make`)."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path

import torch
from torch import nn

from svdtrain.stats import logits_of


class BasicBlock(nn.Module):
    """Two 3×3 convs; a 1×1 conv projection on the shortcut when the shape changes (He et al. 2016)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = _projection(in_planes, planes, stride)

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        return (self.bn2(self.conv2(out)) + self.shortcut(x)).relu()


class Bottleneck(nn.Module):
    """1×1 reduce, 3×3, 1×1 expand (×4), with a projection shortcut when the shape changes."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = _projection(in_planes, out, stride)

    def forward(self, x):
        out = self.bn1(self.conv1(x)).relu()
        out = self.bn2(self.conv2(out)).relu()
        return (self.bn3(self.conv3(out)) + self.shortcut(x)).relu()


def _projection(in_planes: int, out_planes: int, stride: int) -> nn.Module:
    if stride == 1 and in_planes == out_planes:
        return nn.Sequential()
    return nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride, bias=False), nn.BatchNorm2d(out_planes))


def _stage(block, in_planes: int, planes: int, blocks: int, stride: int) -> tuple[nn.Sequential, int]:
    layers = []
    for i in range(blocks):
        layers.append(block(in_planes, planes, stride if i == 0 else 1))
        in_planes = planes * block.expansion
    return nn.Sequential(*layers), in_planes


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. 2016 (widths 16/32/64, depth 6n + 2 with basic blocks).

    bottleneck=True is the variant of the authors' CIFAR code for deep nets:
    depth 9n + 2 with bottleneck blocks (ResNet-56: n = 6, ResNet-110: n = 12).
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3, bottleneck: bool = False):
        super().__init__()
        block, per = (Bottleneck, 9) if bottleneck else (BasicBlock, 6)
        if depth < per + 2 or (depth - 2) % per:
            raise ValueError(f"CIFAR ResNet depth={depth} with {'bottleneck' if bottleneck else 'basic'} blocks; "
                             f"allowed: {per}n + 2 ({', '.join(str(per * n + 2) for n in (2, 3, 6, 12))}, ...)")
        n = (depth - 2) // per
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1, planes = _stage(block, 16, 16, n, 1)
        self.layer2, planes = _stage(block, planes, 32, n, 2)
        self.layer3, planes = _stage(block, planes, 64, n, 2)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.bn1(self.conv1(x)).relu()
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(x.mean((2, 3)))


class ImageNetResNet(nn.Module):
    """ResNet-18/34/50 for 224×224 inputs (He et al. 2016), projection shortcuts."""

    def __init__(self, block, blocks: list[int], num_classes: int = 1000, in_channels: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        planes = 64
        self.layer1, planes = _stage(block, planes, 64, blocks[0], 1)
        self.layer2, planes = _stage(block, planes, 128, blocks[1], 2)
        self.layer3, planes = _stage(block, planes, 256, blocks[2], 2)
        self.layer4, planes = _stage(block, planes, 512, blocks[3], 2)
        self.fc = nn.Linear(planes, num_classes)

    def forward(self, x):
        x = self.maxpool(self.bn1(self.conv1(x)).relu())
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


class LeNet300(nn.Module):
    """LeNet-300-100: a fully connected net on the flattened image."""

    def __init__(self, num_classes: int = 10, in_features: int = 784):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(in_features, 300), nn.Linear(300, 100), nn.Linear(100, num_classes)

    def forward(self, x):
        return self.fc3(self.fc2(self.fc1(x.flatten(1)).relu()).relu())


class LeNet5(nn.Module):
    """LeNet-5: conv 5×5 (6, 'same') → pool → conv 5×5 (16) → pool → 120 → 84 → classes."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28):
        super().__init__()
        side = (image_size // 2 - 4) // 2
        if side < 1:
            raise ValueError(f"LeNet-5 needs images of at least 12×12, got {image_size}")
        self.conv1, self.conv2 = nn.Conv2d(in_channels, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.fc1, self.fc2, self.fc3 = nn.Linear(16 * side * side, 120), nn.Linear(120, 84), nn.Linear(84, num_classes)

    def forward(self, x):
        x = nn.functional.max_pool2d(self.conv1(x).relu(), 2)
        x = nn.functional.max_pool2d(self.conv2(x).relu(), 2)
        return self.fc3(self.fc2(self.fc1(x.flatten(1)).relu()).relu())


class EncoderBlock(nn.Module):
    """A pre-norm transformer block, as torchvision's VisionTransformer has it: x + attention(norm(x)), then
    x + MLP(norm(x)) (Linear, GELU, Linear)."""

    def __init__(self, width: int, heads: int, mlp_width: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.self_attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, mlp_width), nn.GELU(), nn.Linear(mlp_width, width))

    def forward(self, x):
        y = self.ln_1(x)
        x = x + self.self_attention(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class ViT(nn.Module):
    """A vision transformer (Dosovitskiy et al. 2021) sized for small images: patches embedded by a conv (patch ×
    patch, stride patch), learned position embeddings, pre-norm blocks of nn.MultiheadAttention and an MLP, a
    final LayerNorm, the mean over the patches, a Linear head. Mean pooling rather than a class token: one token
    fewer in every attention, and for ViTs trained from scratch on small data it is at least as accurate (Beyer
    et al. 2022, "Better plain ViT baselines")."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28, patch: int = 4,
                 width: int = 96, depth: int = 6, heads: int = 4, mlp_width: int = 192):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"ViT needs an image size divisible by its patch size {patch}, got {image_size}")
        self.patch_embedding = nn.Conv2d(in_channels, width, patch, stride=patch)
        self.position = nn.Parameter(0.02 * torch.randn(1, (image_size // patch) ** 2, width))
        self.blocks = nn.Sequential(*[EncoderBlock(width, heads, mlp_width) for _ in range(depth)])
        self.ln = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        tokens = self.patch_embedding(x).flatten(2).transpose(1, 2) + self.position
        return self.head(self.ln(self.blocks(tokens)).mean(1))


class InvertedResidual(nn.Module):
    """MobileNetV2's block (Sandler et al. 2018): 1×1 expand (×t) → 3×3 depthwise → 1×1 linear project, batch norm
    after each, ReLU6 after the first two; the input added when the shape is kept."""

    def __init__(self, in_planes: int, planes: int, stride: int, expansion: int):
        super().__init__()
        hidden = in_planes * expansion
        layers = [nn.Conv2d(in_planes, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6()] \
            if expansion != 1 else []
        self.layers = nn.Sequential(
            *layers, nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden),
            nn.ReLU6(), nn.Conv2d(hidden, planes, 1, bias=False), nn.BatchNorm2d(planes))
        self.residual = stride == 1 and in_planes == planes

    def forward(self, x):
        return x + self.layers(x) if self.residual else self.layers(x)


class MobileNetV2(nn.Module):
    """MobileNetV2 sized for 28–32² images: the paper's blocks (expansion t, width c, repeats n, stride s), with the
    3×3 stem and the 160-wide stage at stride 1 (three downsamplings: 4² left at 28² inputs), and the widths scaled
    by `width` (half by default, to train on a small CPU in the time ResNet-20 takes), the last 1×1 conv to 640."""

    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 1),
                (6, 320, 1, 1))

    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 0.5):
        super().__init__()

        def scaled(c: int) -> int:  # a multiple of 8, as the paper's width multipliers round
            return max(8, int(c * width + 4) // 8 * 8)

        planes = scaled(32)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, planes, 3, 1, 1, bias=False), nn.BatchNorm2d(planes),
                                  nn.ReLU6())
        blocks = []
        for t, c, n, s in self.SETTINGS:
            for i in range(n):
                blocks.append(InvertedResidual(planes, scaled(c), s if i == 0 else 1, t))
                planes = scaled(c)
        self.blocks = nn.Sequential(*blocks)
        last = scaled(1280) if width > 1 else 640
        self.head = nn.Sequential(nn.Conv2d(planes, last, 1, bias=False), nn.BatchNorm2d(last), nn.ReLU6())
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


def _cifar(depth: int):
    return lambda num_classes, in_channels, image_size, bottleneck=False: CifarResNet(
        depth, num_classes, in_channels, bottleneck)


def _imagenet(block, blocks):
    return lambda num_classes, in_channels, image_size, bottleneck=False: ImageNetResNet(
        block, blocks, num_classes, in_channels)


MODELS = {
    **{f"resnet{d}": _cifar(d) for d in (20, 32, 44, 56, 110)},
    "resnet18": _imagenet(BasicBlock, [2, 2, 2, 2]),
    "resnet34": _imagenet(BasicBlock, [3, 4, 6, 3]),
    "resnet50": _imagenet(Bottleneck, [3, 4, 6, 3]),
    "lenet300": lambda num_classes, in_channels, image_size, bottleneck=False: LeNet300(
        num_classes, in_channels * image_size * image_size),
    "lenet5": lambda num_classes, in_channels, image_size, bottleneck=False: LeNet5(num_classes, in_channels, image_size),
    "mobilenetv2": lambda num_classes, in_channels, image_size, bottleneck=False: MobileNetV2(num_classes, in_channels),
    "vit": lambda num_classes, in_channels, image_size, bottleneck=False: ViT(num_classes, in_channels, image_size),
    # ViT-B/16's size (86 M parameters at 224²): 16² patches, width 768, 12 blocks of 12 heads, a 3072-wide MLP.
    "vit_b16": lambda num_classes, in_channels, image_size, bottleneck=False: ViT(
        num_classes, in_channels, image_size, patch=16, width=768, depth=12, heads=12, mlp_width=3072),
}


def resnet20(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    return CifarResNet(20, num_classes, in_channels)


class ModelError(ValueError):
    """A model reference that cannot be loaded or does not build a model; the message is one line."""


# What the data decides, passed to a user's callable under these names where its signature has them.
DATA_ARGUMENTS = ("num_classes", "in_channels", "image_size")


def is_reference(name: str) -> bool:
    """`name` points at user code (`module:callable` or `file.py:callable`) rather than naming a MODELS entry."""
    return ":" in name


def resolve_reference(name: str) -> str:
    """`name` as a run folder keeps it: a `file.py:callable` with the file's absolute path (so that resuming from
    another folder rebuilds the same model); names and importable references unchanged."""
    if not is_reference(name):
        return name
    target, _, attribute = name.rpartition(":")
    if target.endswith(".py"):
        return f"{Path(target).expanduser().resolve()}:{attribute}"
    return name


_LOADED: dict[str, object] = {}  # reference -> its callable: a file's code runs once per process


def load_callable(name: str):
    """The callable a `module:callable` or `file.py:callable` reference names (the module imported or the
    file run on first use: the user's own code, by their choice)."""
    if name in _LOADED:
        return _LOADED[name]
    target, _, attribute = name.rpartition(":")
    if not target or not attribute:
        raise ModelError(f"model {name!r}: allowed: a model name, package.module:callable or path/to/file.py:callable")
    try:
        if target.endswith(".py"):
            path = Path(target).expanduser().resolve()
            if not path.is_file():
                raise ModelError(f"model {name!r}: no file {path}")
            # A module name of its own per file, so two files called model.py do not replace each other.
            module_name = f"svdtrain_user_{path.stem}_{hashlib.sha1(str(path).encode()).hexdigest()[:8]}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module  # classes defined there resolve their own module (pickling, dataclasses)
            sys.path.insert(0, str(path.parent))  # the file may import its neighbours
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
            finally:
                sys.path.remove(str(path.parent))
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.append(os.getcwd())  # as `python -m` would: packages under the current folder import
            module = importlib.import_module(target)
    except ModelError:
        raise
    except Exception as e:  # noqa: BLE001 -- the user's code: any failure is one line naming it
        raise ModelError(f"model {name!r}: cannot load {target} ({one_line(e)})") from None
    fn = module
    for part in attribute.split("."):
        if not hasattr(fn, part):
            raise ModelError(f"model {name!r}: {target} has no {attribute!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise ModelError(f"model {name!r}: {attribute} is a {type(fn).__name__}, not a callable")
    _check_builds_a_module(name, fn)
    _LOADED[name] = fn
    return fn


def _installed_code() -> list[Path]:
    """The folders of Python's standard library and of installed packages (site-packages)."""
    import site
    import sysconfig

    paths = [sysconfig.get_paths().get(key) for key in ("stdlib", "platstdlib", "purelib", "platlib")]
    paths += [*site.getsitepackages(), site.getusersitepackages()]
    return [Path(p).resolve() for p in dict.fromkeys(paths) if p]


def _check_builds_a_module(name: str, fn):
    """A ModelError, before anything is called, unless `fn` can be what builds a model: an nn.Module class (from
    anywhere), or a Python function (or method) of the user's own: defined in a file that is neither Python's
    standard library nor an installed package (`model=os:system model_args={command=...}` and the like must not
    run the command)."""
    if inspect.isclass(fn):
        if not issubclass(fn, nn.Module):
            raise ModelError(f"model {name!r}: {fn.__qualname__} is a class but not a torch.nn.Module; allowed: an "
                             "nn.Module class or a function that returns a model")
        return
    function = getattr(fn, "__func__", fn)  # a classmethod or method: the function behind it
    if not inspect.isfunction(function):
        raise ModelError(f"model {name!r} is a {type(fn).__name__}, not a Python function; allowed: an nn.Module "
                         "class or a function of your own file or package that returns a model")
    source = Path(inspect.getfile(function)).resolve()
    if any(source.is_relative_to(folder) for folder in _installed_code()):
        raise ModelError(f"model {name!r} is {function.__module__}.{function.__qualname__}, from Python's standard "
                         "library or an installed package; allowed: an nn.Module class, or a function of your own "
                         "file or package (a function in a file of yours may call that one)")


def build_user_model(name: str, num_classes: int, in_channels: int, image_size: int,
                     model_args: dict | None = None) -> nn.Module:
    """The user's callable called with the data's num_classes / in_channels / image_size where its signature takes
    them by name, plus `model_args`; it must return an nn.Module."""
    fn = load_callable(name)
    args = dict(model_args or {})
    clash = sorted(set(args) & set(DATA_ARGUMENTS))
    if clash:
        raise ModelError(f"model_args sets {', '.join(clash)}, which the data decides; allowed: other arguments")
    data = dict(zip(DATA_ARGUMENTS, (num_classes, in_channels, image_size)))
    try:
        parameters = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature: give it model_args alone
        parameters = {}
    args.update({key: value for key, value in data.items() if key in parameters})
    try:
        model = fn(**args)
    except Exception as e:  # noqa: BLE001 -- the user's code
        raise ModelError(f"model {name!r} failed with arguments {args}: {one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"model {name!r} returned {type(model).__name__!r}; allowed: a torch.nn.Module")
    return returning_logits(model)


_RETURNING_LOGITS: dict[type, type] = {}


def returning_logits(model: nn.Module) -> nn.Module:
    """`model`, its forward returning the logits alone where it returns a tuple/list (logits first) or an object
    with `.logits` (Hugging Face's outputs); a tensor passes through. The same instance, of a subclass with that
    forward: its parameter names, its state_dict and isinstance checks stay as they were."""
    cls = type(model)
    if cls in _RETURNING_LOGITS.values():  # a model built before, returned again
        return model
    if cls not in _RETURNING_LOGITS:
        def forward(self, *args, **kwargs):
            return logits_of(super(subclass, self).forward(*args, **kwargs))

        subclass = type(cls.__name__, (cls,), {"forward": forward, "__module__": cls.__module__,
                                               "__qualname__": cls.__qualname__})
        _RETURNING_LOGITS[cls] = subclass
    model.__class__ = _RETURNING_LOGITS[cls]
    return model


def one_line(e: BaseException) -> str:
    """An exception as one line: its type and the first line of its message (which may be empty)."""
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def build_model(name: str, num_classes: int, in_channels: int, image_size: int, bottleneck: bool = False,
                model_args: dict | None = None) -> nn.Module:
    """A MODELS entry by name, or the user's model by reference (see build_user_model)."""
    if is_reference(name):
        return build_user_model(name, num_classes, in_channels, image_size, model_args)
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; allowed: {', '.join(MODELS)}, package.module:callable or "
                         "path/to/file.py:callable")
    if model_args:
        raise ModelError(f"model_args is for a model given by reference; {name} takes none")
    return MODELS[name](num_classes, in_channels, image_size, bottleneck)
