import importlib.util
import os

# The kernels run on the CPU through Triton's interpreter; it must be on before triton.jit runs.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def _torchvision_importable_beside_cpu_torch() -> None:
    """PyPI's torchvision wheels are CUDA builds: beside the CPU torch wheel their compiled ops
    cannot load, and ``import torchvision`` then fails registering fake kernels for two of them
    (``operator torchvision::nms does not exist``). transformers and timm import torchvision,
    and these tests use none of its ops: defining the two schemas lets the Python part import.
    Any call of those ops would still fail loudly (no kernel)."""
    if importlib.util.find_spec("torchvision") is None:
        return
    try:
        torch.ops.torchvision.nms  # noqa: B018 - present when torchvision's ops loaded
        return
    except (AttributeError, RuntimeError):
        pass
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _torchvision_importable_beside_cpu_torch.lib = lib  # keep the definitions alive


_torchvision_importable_beside_cpu_torch()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
