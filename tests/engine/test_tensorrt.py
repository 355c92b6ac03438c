"""TensorRT: the build precision the installed module allows, the float16 ONNX copy, and the
plan runner (fc_edge/engine/tensorrt.py, trt_runner.py).

Without a GPU the runner is driven through a fake ``tensorrt`` module whose "plans" are the ONNX
graphs and whose execution context runs them with onnxruntime, reading and writing the very
memory the runner binds by address: it checks the runner's names, shapes, dtypes, cache
buffers and profile checks, with the torch head (or the onnxruntime runner) as the oracle. The
real thing runs in ``test_tensorrt_gpu_end_to_end`` where ``tensorrt`` and a CUDA GPU exist.
"""

from __future__ import annotations

import ctypes
import importlib.util
import json
import pickle
import shutil
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
import torch

from fc_edge.engine.export import FLOAT16_TOLERANCE, TOLERANCE, export_engine, relative_error
from fc_edge.engine.runner import EngineHead, choose_backend, load_manifest
from fc_edge.engine.tensorrt import (
    build_engines,
    choose_precision,
    network_creation_flags,
    optimization_profiles,
)
from fc_edge.engine.trt_runner import TensorRTEngines
from fc_edge.errors import ConfigError
from fc_edge.models.local import generate_split
from fc_edge.models.split import split

# --- a fake tensorrt module ----------------------------------------------------------------------

ORT_TYPES = {"tensor(float)": ("FLOAT", np.float32), "tensor(float16)": ("HALF", np.float16),
             "tensor(int64)": ("INT64", np.int64)}


def fake_trt(fp16=True, strongly_typed=True, explicit_batch=False, tf32=True, version="10.99.0"):
    """A stand-in for the tensorrt module: the flag enums decide the precision; the builder's
    "plan" is the parsed ONNX file and the profile; the runtime runs it with onnxruntime."""
    import onnxruntime as ort

    trt = SimpleNamespace(__version__=version, calls=[], float32="float32")
    builder_flags = {"FP16": 0, "OBEY_PRECISION_CONSTRAINTS": 3} if fp16 else {}
    if tf32:
        builder_flags["TF32"] = 1
    trt.BuilderFlag = SimpleNamespace(**builder_flags, INT8=2)
    trt.LayerType = SimpleNamespace(**{k: k for k in ("REDUCE", "SOFTMAX", "NORMALIZATION",
                                                       "ELEMENTWISE", "UNARY", "MATRIX_MULTIPLY",
                                                       "OTHER")})
    trt.ElementWiseOperation = SimpleNamespace(POW="pow", PROD="prod", SUM="sum")
    trt.UnaryOperation = SimpleNamespace(SQRT="sqrt", RECIP="recip")
    creation = {}
    if explicit_batch:
        creation["EXPLICIT_BATCH"] = 0
    if strongly_typed:
        creation["STRONGLY_TYPED"] = 1
    trt.NetworkDefinitionCreationFlag = SimpleNamespace(**creation)
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level: None})
    trt.TensorIOMode = SimpleNamespace(INPUT="input", OUTPUT="output")
    trt.DataType = SimpleNamespace(FLOAT="float", HALF="half", INT64="int64", INT32="int32")

    # ONNX op -> (layer type, operation), the way TensorRT's parser maps them
    layer_of = {"ReduceMean": ("REDUCE", None), "Softmax": ("SOFTMAX", None),
                "Pow": ("ELEMENTWISE", "pow"), "Mul": ("ELEMENTWISE", "prod"),
                "Add": ("ELEMENTWISE", "sum"), "Sqrt": ("UNARY", "sqrt"),
                "Reciprocal": ("UNARY", "recip"), "MatMul": ("MATRIX_MULTIPLY", None)}

    class Layer:
        def __init__(self, node):
            self.node, self.precision, self.outputs = node, None, {}
            self.type, self.op = layer_of.get(node.op_type, ("OTHER", None))
            self.num_outputs = len(node.output)

        def set_output_type(self, index, dtype):
            self.outputs[index] = dtype

    class Network:
        def __init__(self, flags):
            self.flags, self.onnx, self.layers = flags, None, []

        @property
        def num_layers(self):
            return len(self.layers)

        def get_layer(self, i):
            return self.layers[i]

    class Parser:
        def __init__(self, network, logger):
            self.network, self.num_errors = network, 0

        def parse_from_file(self, path):
            self.network.onnx = path
            graph = onnx.load(path, load_external_data=False).graph
            self.network.layers = [Layer(n) for n in graph.node]
            return True

    class Config:
        def __init__(self):
            self.set, self.cleared, self.profile = [], [], None

        def set_flag(self, flag):
            self.set.append(flag)

        def clear_flag(self, flag):
            self.cleared.append(flag)

        def add_optimization_profile(self, profile):
            self.profile = profile

    class Profile(dict):
        def set_shape(self, name, lo, opt, hi):
            self[name] = (tuple(lo), tuple(opt), tuple(hi))

    class Builder:
        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            trt.calls.append({"network_flags": network.flags, "onnx": network.onnx,
                              "set": config.set, "cleared": config.cleared,
                              "layers": network.layers})
            # the "plan" runs the graph: its weights inlined (they point into a file beside it)
            model = onnx.load(network.onnx)
            return pickle.dumps({"onnx": model.SerializeToString(),
                                 "profile": dict(config.profile)})

    class Engine:
        def __init__(self, plan):
            self.session = ort.InferenceSession(plan["onnx"], providers=["CPUExecutionProvider"])
            self.profile = plan["profile"]
            self.io = {v.name: ("input", v.type) for v in self.session.get_inputs()}
            self.io.update({v.name: ("output", v.type) for v in self.session.get_outputs()})
            self.num_io_tensors = len(self.io)

        def get_tensor_name(self, i):
            return list(self.io)[i]

        def get_tensor_mode(self, name):
            return self.io[name][0]

        def get_tensor_dtype(self, name):
            return getattr(trt.DataType, ORT_TYPES[self.io[name][1]][0])

        def get_tensor_profile_shape(self, name, index):
            assert index == 0
            return self.profile[name]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_input_shape(self, name, shape):
            lo, _, hi = self.engine.profile[name]
            self.shapes[name] = tuple(shape)
            return all(a <= s <= b for s, a, b in zip(shape, lo, hi, strict=True))

        def set_tensor_address(self, name, address):
            self.addresses[name] = address
            return True

        def _array(self, name, shape):
            dtype = ORT_TYPES[self.engine.io[name][1]][1]
            n = int(np.prod(shape)) * np.dtype(dtype).itemsize
            return np.frombuffer((ctypes.c_char * n).from_address(self.addresses[name]),
                                 dtype=dtype).reshape(shape)

        def _run(self, feeds):
            names = [n for n, (mode, _) in self.engine.io.items() if mode == "output"]
            return dict(zip(names, self.engine.session.run(names, feeds), strict=True))

        def get_tensor_shape(self, name):
            if name in self.shapes:
                return self.shapes[name]
            zeros = {n: np.zeros(s, ORT_TYPES[self.engine.io[n][1]][1])
                     for n, s in self.shapes.items()}
            return self._run(zeros)[name].shape

        def execute_async_v3(self, stream):
            assert stream == 0
            outs = self._run({n: self._array(n, s).copy() for n, s in self.shapes.items()})
            for name, value in outs.items():
                self._array(name, value.shape)[...] = value  # the bound torch tensor's memory
            return True

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, data):
            try:
                return Engine(pickle.loads(data))
            except Exception:
                return None  # what TensorRT does with a foreign plan (after logging why)

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, Parser, Runtime
    return trt


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llama16(tiny_llama, tmp_path_factory):
    """tiny Llama at split layer 2 with the float16 graphs (torchscript exporter: fast)."""
    torch.set_num_threads(1)
    return export_engine(tiny_llama, 2, tmp_path_factory.mktemp("engines16"),
                         model_spec="synthetic:tiny-llama", float16=True, exporter="torchscript")


def built(result, tmp_path, trt, allow_fp16=True):
    """A copy of the exported folder with plans built by ``trt``; its manifest updated."""
    folder = tmp_path / result.folder.name
    shutil.copytree(result.folder, folder)
    manifest = load_manifest(folder)
    manifest["tensorrt"] = build_engines(folder, manifest, trt=trt, allow_fp16=allow_fp16)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder, manifest


def trt_head(folder, manifest, trt):
    """An EngineHead whose tensorrt backend runs on the fake module on the CPU."""
    engine = EngineHead(folder, providers=["CPUExecutionProvider"], manifest=manifest, threads=1)
    engine.backend, engine.trt = "tensorrt", TensorRTEngines(folder, manifest, trt=trt,
                                                             device="cpu")
    return engine


# --- the precision decision ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fp16", "strong", "explicit", "want"),
    [
        # TensorRT 10.x (JetPack 6: 10.3) has both flags: the strongly typed network wins
        (True, True, True, ("fp16", "strong", [], ["EXPLICIT_BATCH", "STRONGLY_TYPED"],
                            "float16")),
        (True, True, False, ("fp16", "strong", [], ["STRONGLY_TYPED"], "float16")),
        (True, False, False, ("fp16", "weak", ["FP16", "OBEY_PRECISION_CONSTRAINTS"], [],
                              "float32")),
        (False, True, False, ("fp16", "strong", [], ["STRONGLY_TYPED"], "float16")),
        (False, True, True, ("fp16", "strong", [], ["EXPLICIT_BATCH", "STRONGLY_TYPED"],
                             "float16")),
        (False, False, False, ("fp32", "weak", [], [], "float32")),
    ],
)
def test_choose_precision(fp16, strong, explicit, want):
    trt = fake_trt(fp16=fp16, strongly_typed=strong, explicit_batch=explicit)
    p = choose_precision(trt)
    assert (p.precision, p.typing, list(p.builder_flags), list(p.network_flags),
            p.onnx_dtype) == want
    assert p.cleared_flags == (("TF32",) if p.precision == "fp32" else ())
    assert p.plan_file("decode") == f"decode.{want[0]}.plan"
    # explicit batch is enum value 0, strongly typed 1: the mask has those bits
    bits = {"EXPLICIT_BATCH": 1, "STRONGLY_TYPED": 2}
    assert network_creation_flags(trt, p) == sum(bits[n] for n in want[3])
    fp32 = choose_precision(trt, allow_fp16=False)
    assert (fp32.precision, fp32.builder_flags, fp32.onnx_dtype) == ("fp32", (), "float32")
    assert choose_precision(fake_trt(fp16=False, strongly_typed=False, tf32=False)) \
        .cleared_flags == ()


@pytest.mark.parametrize(
    ("fp16", "strong", "precision", "onnx_file", "set_flags", "network_flags"),
    [
        (True, True, "fp16", "prefill.float16.onnx", [], 2),  # TensorRT 9-10: strongly typed
        (True, False, "fp16", "prefill.onnx", [0, 3], 0),  # TensorRT 8: FP16 flag, pinned norms
        (False, True, "fp16", "prefill.float16.onnx", [], 2),  # TensorRT 11: strongly typed
        (False, False, "fp32", "prefill.onnx", [], 0),  # neither
    ],
)
def test_build_engines_names_what_it_built(llama16, tmp_path, fp16, strong, precision,
                                           onnx_file, set_flags, network_flags):
    trt = fake_trt(fp16=fp16, strongly_typed=strong)
    folder, manifest = built(llama16, tmp_path, trt)
    entry = manifest["tensorrt"]
    assert entry["precision"] == precision and entry["version"] == trt.__version__
    assert entry["prefill"] == f"prefill.{precision}.plan"
    assert entry["decode"] == f"decode.{precision}.plan"
    assert entry["onnx"]["prefill"] == onnx_file
    assert sorted(p.name for p in folder.glob("*.plan")) == [
        f"decode.{precision}.plan", f"prefill.{precision}.plan"]
    prefill_call = trt.calls[0]
    assert prefill_call["onnx"].endswith(onnx_file)
    assert prefill_call["set"] == set_flags and prefill_call["network_flags"] == network_flags
    assert prefill_call["cleared"] == ([1] if precision == "fp32" else [])
    assert entry["profiles"]["decode"]["past_key_values.0.key"][2] == [1, 2, 4095, 16]
    layers = prefill_call["layers"]
    pinned = [layer for layer in layers if layer.precision is not None]
    if 3 in set_flags:  # weakly typed fp16: norm statistics and softmax pinned to float32
        stats = {"Pow", "ReduceMean", "Sqrt", "Reciprocal", "Softmax"}
        assert {layer.node.op_type for layer in pinned} <= stats
        assert len(pinned) == sum(layer.node.op_type in stats for layer in layers) > 0
        assert {"ReduceMean", "Softmax"} <= {layer.node.op_type for layer in pinned}
        assert all(layer.precision == "float32" and set(layer.outputs.values()) == {"float32"}
                   for layer in pinned)
        assert entry["pinned_float32_layers"]["prefill"] == len(pinned)
    else:
        assert not pinned and "pinned_float32_layers" not in entry


def test_strongly_typed_build_needs_the_float16_graphs(llama_engine, tmp_path):
    folder = tmp_path / "e"
    shutil.copytree(llama_engine.folder, folder)
    with pytest.raises(ConfigError, match="float16 ONNX"):
        build_engines(folder, load_manifest(folder), trt=fake_trt(fp16=False))


# --- the float16 ONNX copy -----------------------------------------------------------------------


def test_float16_graphs(llama16, tiny_llama):
    folder, m = llama16.folder, llama16.manifest
    for graph in ("prefill", "decode"):
        f32 = onnx.load(str(folder / m["graphs"][graph]["file"]))
        f16 = onnx.load(str(folder / m["graphs_float16"][graph]["file"]))
        assert [i.name for i in f16.graph.input] == [i.name for i in f32.graph.input]
        assert [o.name for o in f16.graph.output] == [o.name for o in f32.graph.output]
        weights = [t for t in f16.graph.initializer if len(t.dims) >= 2]
        assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
        n_params = sum(int(np.prod(t.dims)) for t in weights)
        assert n_params >= tiny_llama.model.embed_tokens.weight.numel()
        io = m["graphs_float16"][graph]
        assert io["outputs"]["activation"]["dtype"] == "float32"
        assert io["outputs"]["present.1.value"]["dtype"] == "float16"
    assert m["graphs_float16"]["decode"]["inputs"]["past_key_values.0.key"]["dtype"] == "float16"
    errors = m["verification_float16"]["max_relative_error"]
    assert errors and max(errors.values()) <= FLOAT16_TOLERANCE


def test_float16_graphs_match_the_float32_graphs_on_onnxruntime(llama16):
    """onnxruntime's CPU provider runs the float16 graph (casting where it lacks fp16 kernels):
    the same activations as the float32 graph within fp16 rounding, on new prompt lengths."""
    e32 = EngineHead(llama16.folder, providers=["CPUExecutionProvider"], threads=1)
    e16 = EngineHead(llama16.folder, providers=["CPUExecutionProvider"], threads=1,
                     onnx_dtype="float16")
    gen = torch.Generator().manual_seed(3)
    for n in (4, 19):
        ids = torch.randint(0, 256, (n + 3,), generator=gen)
        s32, s16 = e32.start(n + 3), e16.start(n + 3)
        for chunk in [ids[:n], ids[n : n + 1], ids[n + 1 : n + 2], ids[n + 2 :]]:
            ref = s32.step(chunk)
            assert relative_error(s16.step(chunk), ref) <= FLOAT16_TOLERANCE
        assert s16.past[0].dtype == np.float16
        assert relative_error(s16.past[3], s32.past[3]) <= FLOAT16_TOLERANCE


# --- the runner, through the fake module ---------------------------------------------------------


def run_steps(session, ids, n):
    return [session.step(c) for c in [ids[:n]] + [ids[n + j : n + j + 1] for j in range(3)]]


@pytest.mark.parametrize(("strong", "tolerance"), [(False, TOLERANCE), (True, FLOAT16_TOLERANCE)])
def test_runner_prefill_and_decode_match_the_torch_head(llama16, tiny_llama, tmp_path, strong,
                                                        tolerance):
    """Prefill + 3 decode steps through the runner's bindings; strong builds the strongly
    typed plan from the float16 graphs (float16 caches in the runner's buffers); the fake's
    weakly typed "plan" runs the float32 graph."""
    trt = fake_trt(strongly_typed=strong)
    folder, manifest = built(llama16, tmp_path, trt)
    engine = trt_head(folder, manifest, trt)
    head, _ = split(tiny_llama, 2)
    assert engine.trt.kv_dtype == (torch.float16 if strong else torch.float32)
    ids = torch.randint(0, 256, (14,), generator=torch.Generator().manual_seed(5))
    hs, ts = head.start(14), engine.start(14)
    for got, want in zip(run_steps(ts, ids, 11), run_steps(hs, ids, 11), strict=True):
        assert got.dtype == torch.float32 and relative_error(got, want) <= tolerance
    assert ts.position == 14 and ts.past[0].shape == (1, 2, 14, 16)
    assert relative_error(ts.past[2], hs.k_cache[1, 0, :, :14]) <= tolerance
    # a multi-token step after the prefill runs the decode plan once per token
    ts2, hs2 = engine.start(9), head.start(9)
    ts2.step(ids[:4]), hs2.step(ids[:4])
    assert relative_error(ts2.step(ids[4:9]), hs2.step(ids[4:9])) <= tolerance


def test_runner_generates_the_torch_tokens(llama16, tiny_llama, tmp_path):
    trt = fake_trt(fp16=False)
    folder, manifest = built(llama16, tmp_path, trt, allow_fp16=False)
    assert manifest["tensorrt"]["precision"] == "fp32"
    head, tail = split(tiny_llama, 2)
    ids = torch.tensor([1, 17, 42, 99, 3, 250, 7])
    engine = trt_head(folder, manifest, trt)
    assert generate_split(engine, tail, ids, 12) == generate_split(head, tail, ids, 12)


def test_runner_fourier_block_matches_the_codec(qwen2_fourier_engine, tmp_path):
    """The in-graph block through the runner equals FourierCodec's own block, including
    prompts shorter than the block's 2 k_s - 1 = 5 rows, which the plan's profile now takes
    (from 1 token) and whose block the runner computes from the (1, S, D) activation."""
    from fc_edge.codecs.spectral import FourierCodec

    trt = fake_trt(strongly_typed=False)
    folder, manifest = built(qwen2_fourier_engine, tmp_path, trt)
    assert manifest["tensorrt"]["profiles"]["prefill"]["input_ids"][0] == [1, 1]
    engine = trt_head(folder, manifest, trt)
    ort = EngineHead(folder, providers=["CPUExecutionProvider"], threads=1)
    codec = FourierCodec(k_s=3, k_d=8, value_dtype="float32")
    ids = torch.arange(20, 40)
    for n in (1, 3, 5, 12):
        ts, os_ = engine.start(n + 3), ort.start(n + 3)
        for chunk in [ids[:n]] + [ids[n + j : n + j + 1] for j in range(3)]:
            a = ts.step(chunk)
            assert relative_error(a, os_.step(chunk)) <= TOLERANCE
            enc = codec.encode(a)
            block = enc.tensors["coefs"].float() * enc.tensors["scale"].view(-1, 1, 1, 1)
            assert ts.last_block.shape == block.shape
            assert relative_error(ts.last_block, block) <= 1e-5


def test_runner_refuses_shapes_outside_its_profile(llama16, tmp_path):
    trt = fake_trt()
    folder, manifest = built(llama16, tmp_path, trt)
    engine = trt_head(folder, manifest, trt)
    with pytest.raises(ConfigError, match="outside the TensorRT profile"):
        engine.start(2100).step(torch.zeros(2049, dtype=torch.long))
    with pytest.raises(ConfigError, match="at most 4096 positions"):
        engine.start(5000)


# --- refusals ------------------------------------------------------------------------------------


def test_runner_refusals(llama16, llama_engine, tmp_path, monkeypatch):
    trt = fake_trt()
    folder, manifest = built(llama16, tmp_path, trt)
    with pytest.raises(ConfigError, match="has no TensorRT plans"):
        TensorRTEngines(llama_engine.folder, llama_engine.manifest, trt=trt)
    with pytest.raises(ConfigError, match=r"built by TensorRT 10\.99\.0, this is TensorRT 11"):
        TensorRTEngines(folder, manifest, trt=fake_trt(version="11.4.0"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="needs a CUDA GPU"):
        TensorRTEngines(folder, manifest, trt=trt)
    (folder / manifest["tensorrt"]["decode"]).write_bytes(b"a plan of another TensorRT")
    with pytest.raises(ConfigError, match="cannot load .*decode.fp16.plan"):
        TensorRTEngines(folder, manifest, trt=trt, device="cpu")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "tensorrt" else real_find_spec(name, *a))
    with pytest.raises(ConfigError, match="needs the tensorrt package"):
        EngineHead(folder, backend="tensorrt")
    # auto picks onnxruntime without tensorrt (and without a GPU), explicit providers too
    assert EngineHead(folder).backend == "onnxruntime"
    assert choose_backend(folder, manifest, "auto", ["CPUExecutionProvider"]) == "onnxruntime"
    with pytest.raises(ConfigError, match="engine backend must be"):
        EngineHead(folder, backend="tensorrrt")


def test_auto_backend_takes_the_plans_where_tensorrt_and_a_gpu_are(llama16, tmp_path,
                                                                    monkeypatch):
    folder, manifest = built(llama16, tmp_path, fake_trt())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        SimpleNamespace() if name == "tensorrt" else real_find_spec(name, *a)))
    assert choose_backend(folder, manifest, "auto", None) == "tensorrt"
    assert choose_backend(folder, manifest, "onnxruntime", None) == "onnxruntime"
    (folder / manifest["tensorrt"]["prefill"]).unlink()
    assert choose_backend(folder, manifest, "auto", None) == "onnxruntime"


def test_profiles_follow_the_manifest(llama16):
    p = optimization_profiles(llama16.manifest)
    assert p["prefill"]["input_ids"] == ((1, 1), (1, 128), (1, 2048))
    assert set(p["decode"]) == {"input_ids", "position_ids",
                                *[f"past_key_values.{i}.{k}" for i in range(2)
                                  for k in ("key", "value")]}


# --- the real thing ------------------------------------------------------------------------------

HAS_TRT_GPU = importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available()


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_TRT_GPU, reason="needs the tensorrt package and a CUDA GPU")
@pytest.mark.parametrize("allow_fp16", [True, False])
def test_tensorrt_gpu_end_to_end(tiny_llama, tmp_path, allow_fp16):
    """Export, build with the installed TensorRT, prefill + 3 decode steps against the torch
    head; with float32 plans, generate's tokens equal the torch head's."""
    result = export_engine(tiny_llama, 2, tmp_path, model_spec="synthetic:tiny-llama",
                           tensorrt=allow_fp16, float16=True, exporter="torchscript")
    folder, manifest = result.folder, result.manifest
    if not allow_fp16:
        manifest["tensorrt"] = build_engines(folder, manifest, allow_fp16=False)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    precision = manifest["tensorrt"]["precision"]
    assert (folder / f"prefill.{precision}.plan").is_file()
    tolerance = 1e-3 if precision == "fp32" else 2 * FLOAT16_TOLERANCE
    engine = EngineHead(folder)
    assert engine.backend == "tensorrt"
    head, tail = split(tiny_llama, 2)
    ids = torch.randint(0, 256, (14,), generator=torch.Generator().manual_seed(5))
    hs, ts = head.start(14), engine.start(14)
    for got, want in zip(run_steps(ts, ids, 11), run_steps(hs, ids, 11), strict=True):
        assert got.is_cuda and relative_error(got.cpu(), want) <= tolerance
    assert relative_error(ts.past[3].cpu(), hs.v_cache[1, 0, :, :14]) <= tolerance
    if precision == "fp32":  # the tail runs on the CPU here: bring each activation back
        def start(n):
            session = engine.start(n)
            return SimpleNamespace(step=lambda ids: session.step(ids).cpu())

        prompt = torch.tensor([1, 17, 42, 99, 3, 250, 7])
        on_cpu = SimpleNamespace(start=start)
        assert generate_split(on_cpu, tail, prompt, 8) == generate_split(head, tail, prompt, 8)


def test_cli_generate_on_plans_it_cannot_run_is_one_line(llama16, tmp_path, capsys):
    """`generate --engine DIR --engine-backend tensorrt` on a folder without plans (or here,
    without tensorrt and a GPU) stops in one line before loading the model or connecting."""
    from fc_edge.cli import main

    rc = main(["generate", "--engine", str(llama16.folder), "--engine-backend", "tensorrt",
               "--server", "127.0.0.1:1", "--prompt", "hi"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "\n" not in err
    assert "has no TensorRT plans" in err and "--engine-backend onnxruntime" in err
