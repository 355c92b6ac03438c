"""The device head as an engine: a device bundle (:func:`export_engine`: the head's weights,
ONNX graphs sharing them, tokenizer, manifest, TensorRT plans where TensorRT is), an onnxruntime
runner (:class:`EngineHead`, a drop-in for the torch head), TensorRT plan builds and their
runner (:mod:`fc_edge.engine.trt_runner`), and :func:`open_bundle` for the device client."""

from fc_edge.engine.bundle import load_manifest
from fc_edge.engine.export import ExportError, ExportResult, export_engine
from fc_edge.engine.runner import EngineHead, open_bundle

__all__ = ["EngineHead", "ExportError", "ExportResult", "export_engine", "load_manifest",
           "open_bundle"]
