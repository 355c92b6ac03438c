"""The device head as an engine: ONNX export (:func:`export_engine`), an onnxruntime runner
(:class:`EngineHead`, a drop-in for the torch head), TensorRT plan builds and their runner
(:mod:`fc_edge.engine.trt_runner`)."""

from fc_edge.engine.export import ExportError, ExportResult, export_engine
from fc_edge.engine.runner import EngineHead, load_manifest

__all__ = ["EngineHead", "ExportError", "ExportResult", "export_engine", "load_manifest"]
