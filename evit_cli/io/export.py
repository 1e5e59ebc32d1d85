"""Deployment formats: ONNX and TorchScript, with fixed token counts and a dynamic batch axis.

EViT's token counts depend only on the input size, so the exported graph holds
them as constants; the batch axis stays dynamic. Every export is checked by
running the written file and comparing it with PyTorch.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from torch import nn

from .. import adapters
from ..errors import EvitError
from ..utils.files import apply_umask

FORMATS = {"onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
TOLERANCE = 1e-3


class _Logits(nn.Module):
    """The model with one plain tensor as its output (transformers returns an output object): its
    adapter's output, the logits or for a headless model the embedding its users take."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.adapter = adapters.get_adapter(model)

    def forward(self, x):
        return self.adapter.outputs(self.model, x)


def _export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise EvitError("ONNX export needs the onnx extra: pip install 'evit-cli[onnx]'") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    torch.onnx.export(model, (x,), str(path), input_names=["pixel_values"], output_names=["logits"],
                      dynamic_shapes=({0: batch},), dynamo=True, external_data=False, verbose=False,
                      custom_translation_table=_translations())


def _translations() -> dict:
    """ONNX translations the exporter lacks. ``aten._is_all_true``: the test of ``torch._check_tensor_all``
    (transformers' checks on SigLIP 2's ``spatial_shapes``, in its position-embedding resize): the exporter drops
    the assertion reading it but has no translation for the test itself, now dead ("No ONNX function found")."""
    target = getattr(getattr(torch.ops.aten, "_is_all_true", None), "default", None)
    return {} if target is None else {target: _is_all_true}


def _is_all_true(x):
    from onnx import TensorProto
    from onnxscript import opset18 as op

    return op.Cast(op.ReduceMin(op.Cast(x, to=TensorProto.INT32), keepdims=0), to=TensorProto.BOOL)


def onnx_session(path: Path, threads: int | None = None):
    """An ONNX Runtime session on the CPU provider (``threads`` intra-op threads; default: its own choice)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise EvitError("running an ONNX file needs onnxruntime: pip install 'evit-cli[onnx]'") from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _run_onnx(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = onnx_session(path)
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _export_torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    import warnings

    with warnings.catch_warnings():  # jit is deprecated upstream but still what many runtimes load
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, x, check_trace=False)
        torch.jit.save(traced, str(path))


def _run_torchscript(path: Path, x: torch.Tensor) -> torch.Tensor:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.jit.load(str(path), map_location="cpu")(x)


def export(model: nn.Module, fmt: str, output: str | os.PathLike, *, check_batches=(1, 8),
           overwrite: bool = False) -> dict:
    """Write ``model`` as ``fmt`` (onnx or torchscript) to ``output``, then run the file on random
    batches and compare it with PyTorch; fails (and leaves nothing) above 1e-3."""
    if fmt not in FORMATS:
        raise EvitError(f"unknown format {fmt!r}: use one of {', '.join(FORMATS)}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise EvitError(f"{output} already exists: choose another -o, or pass --overwrite")
    if any(b < 1 for b in check_batches):
        raise EvitError("check batch sizes must be at least 1")
    adapter = adapters.get_adapter(model)
    img = adapter.img_size(model)
    wrapped = _Logits(model.cpu().eval()).eval()
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        x = torch.randn(2, 3, img, img)
        with torch.no_grad():
            (_export_onnx if fmt == "onnx" else _export_torchscript)(wrapped, x, tmp)
            diffs, scale = {}, 1.0
            for b in check_batches:
                xb = torch.randn(b, 3, img, img, generator=torch.Generator().manual_seed(b))
                got, ref = (_run_onnx if fmt == "onnx" else _run_torchscript)(tmp, xb), wrapped(xb)
                diffs[str(b)] = float((got - ref).abs().max())
                scale = max(scale, float(ref.abs().max()))
        worst = max(diffs.values())
        if not worst <= TOLERANCE * scale:  # relative to outputs above 1 (float32 rounding grows with them)
            raise EvitError(f"the {fmt} file differs from PyTorch by {worst:.2e} (> {TOLERANCE} x {scale:.3g}, the "
                            f"outputs' scale): not written; please report it")
        apply_umask(tmp)  # mkstemp made it 0600
        os.replace(tmp, output)
    except OSError as e:
        raise EvitError(f"could not write {output}: {e.strerror or e}; free some space or choose another -o") from None
    finally:
        tmp.unlink(missing_ok=True)
        for extra in output.parent.glob(f"{tmp.name}*"):
            extra.unlink(missing_ok=True)
    from ..model.convert import tokens_after_layers

    return {"format": fmt, "output": str(output), "img_size": img, "input": [None, 3, img, img],
            "tokens_after_layers": tokens_after_layers(model), "max_abs_diff": diffs, "tolerance": TOLERANCE,
            "bytes": output.stat().st_size}
