"""Lean compile and load (issue 12): per-stage peaks in the manifest, the patched model read tensor by tensor from
sharded checkpoints, weights beside the graph, the fp16 load without ONNX Runtime's constant folding."""
import platform
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from toolkit.artifact import Manifest
from toolkit.backends import open_backend
from toolkit.errors import ToolkitError
from toolkit.memory import StagePeaks, resident_mb
from toolkit.patches.modeling_qwen3 import Qwen3ForDeployment
from toolkit.synth import write_synthetic_checkpoint


def _kernel_resets_the_peak() -> bool:
    """Probe the kernel itself, without the toolkit: does writing 5 to /proc/self/clear_refs lower VmHWM?"""
    def hwm_mb():
        return int(re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) // 1024
    try:
        block = np.ones(200 * 2**20 // 8)  # 200 MB, every page touched, then unmapped
        del block
        before = hwm_mb()
        Path("/proc/self/clear_refs").write_text("5")
        return hwm_mb() < before - 150
    except (OSError, AttributeError):
        return False


def test_a_stage_records_its_own_peak_not_the_process_s():
    if not _kernel_resets_the_peak():
        pytest.skip("this kernel does not let a process reset its peak RSS (/proc/self/clear_refs)")
    peaks = StagePeaks()
    with peaks.stage("big"):
        block = np.ones(300 * 2**20 // 8)  # 300 MB, every page touched
        del block
    with peaks.stage("small"):
        pass
    assert peaks.mb["small"] < peaks.mb["big"] - 250  # the small stage's peak starts again, not at the big one's
    assert peaks.mb["big"] >= resident_mb() + 250
    assert peaks.peak() == peaks.mb["big"]


CHURN = """
import ctypes, ctypes.util, sys
from toolkit.memory import map_large_blocks, resident_mb
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.free(libc.malloc(16 << 20))  # freeing a mapped block: glibc's default raises its threshold to 16 MB
if sys.argv[1] == "mapped":
    map_large_blocks()
before, blocks, pins = resident_mb(), [], []
for _ in range(32):  # a model's per-layer temporaries (8 MB), something smaller and long-lived after each
    blocks.append(libc.malloc(8 << 20))
    ctypes.memset(blocks[-1], 1, 8 << 20)
    pins.append(libc.malloc(512 << 10))
for block in blocks:
    libc.free(block)
print(resident_mb() - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc tuning")
def test_compile_s_large_temporaries_go_back_to_the_os_when_freed():
    import subprocess
    import sys

    def retained_mb(mode):
        return int(subprocess.run([sys.executable, "-c", CHURN, mode], check=True, capture_output=True,
                                  text=True).stdout)
    assert retained_mb("default") >= 200  # 256 MB freed but kept by the heap, counted in RSS
    assert retained_mb("mapped") <= 16


def test_compile_writes_the_peak_of_every_stage_and_keeps_weights_beside_the_graph(onnx_artifacts):
    manifest = Manifest.load(onnx_artifacts["embedding"][0])
    stages = manifest.build["stage_peak_rss_mb"]
    assert list(stages) == ["load", "export", "reference", "fold", "validate"]
    assert all(isinstance(mb, int) and mb > 0 for mb in stages.values())
    assert manifest.build["peak_rss_mb"] == max(stages.values())
    model = manifest.model_file
    assert {model, f"{model}.data"} <= set(manifest.files)  # the graph and its weights, both hashed
    assert not (manifest.path / "graph").exists()


def test_validation_runs_the_reference_before_it_loads_the_artifact(onnx_artifacts, checkpoints, tokenizers,
                                                                   monkeypatch):
    # the reference and the artifact are never resident together: validation's peak is the larger of the two
    import toolkit.validation as validation
    from toolkit.backends import LayerwiseReference
    from toolkit.tasks import TASKS

    events = []
    reference = LayerwiseReference(checkpoints["embedding"], TASKS["embedding"])
    run_reference, load = reference.run, validation.load_backend
    monkeypatch.setattr(reference, "run", lambda *args: events.append("reference") or run_reference(*args))
    monkeypatch.setattr(validation, "load_backend", lambda manifest: events.append("load") or load(manifest))
    stats = validation.measure(Manifest.load(onnx_artifacts["embedding"][0]), reference, tokenizers["embedding"])
    assert stats["passed"] and stats["min_cosine"] > 0.9999
    assert events[-1] == "load" and set(events[:-1]) == {"reference"}


def test_patched_model_reads_a_sharded_checkpoint_as_the_single_file(checkpoints, tmp_path):
    sharded = write_synthetic_checkpoint(tmp_path / "sharded", "reranker", "tiny", max_shard_bytes=60_000)
    assert len(list(sharded.glob("*.safetensors"))) >= 3
    single = Qwen3ForDeployment.from_pretrained(checkpoints["reranker"], "yes_no_logits", torch.float16)
    split = Qwen3ForDeployment.from_pretrained(sharded, "yes_no_logits", torch.float16)
    assert single.state_dict().keys() == split.state_dict().keys()
    for name, tensor in single.state_dict().items():
        assert tensor.dtype == torch.float16 and tensor.device.type == "cpu", name
        assert torch.equal(tensor, split.state_dict()[name]), name


@pytest.mark.parametrize("stream", [False, True])
def test_a_checkpoint_that_does_not_fit_its_config_is_refused_by_name(tmp_path, stream):
    import json

    from safetensors.torch import load_file, save_file

    checkpoint = write_synthetic_checkpoint(tmp_path / "ckpt", "embedding", "tiny")
    config = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**config, "intermediate_size": 96}))
    with pytest.raises(ToolkitError, match=r"gate_up_proj.weight.*do not belong together"):
        Qwen3ForDeployment.from_pretrained(checkpoint, "last_hidden", torch.float16, stream=stream)
    (checkpoint / "config.json").write_text(json.dumps(config))
    tensors = load_file(checkpoint / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.endswith("layers.1.self_attn.k_proj.weight")},
              checkpoint / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ToolkitError, match=r"does not match Qwen3: missing \['layers.1.self_attn.k_proj.weight'\]"):
        Qwen3ForDeployment.from_pretrained(checkpoint, "last_hidden", torch.float16, stream=stream)


def test_fp16_artifacts_load_on_cpu_without_onnx_runtime_s_constant_folding(onnx_artifacts, monkeypatch):
    """Its folding would hold every fp16 weight and its fp32 copy at once (twice the load's peak); compile folds the
    graph's other constants itself, so nothing else is lost. Only fp16 on CPU: on CUDA the casts would run per call."""
    import onnxruntime

    from toolkit import backends

    opened = []
    real_session = onnxruntime.InferenceSession

    def session(*args, disabled_optimizers=None, **kwargs):
        opened.append(disabled_optimizers)
        return real_session(*args, disabled_optimizers=disabled_optimizers, **kwargs)

    monkeypatch.setattr(onnxruntime, "InferenceSession", session)
    monkeypatch.setattr(backends, "_sessions", {})  # a session another test opened would be shared, not opened
    manifest = Manifest.load(onnx_artifacts["embedding"][0])
    assert manifest.dtype == "fp16" and manifest.target.device == "cpu"
    open_backend(manifest).close()
    assert opened == [["ConstantFolding"]]


RUNS_ARTIFACTS_ONLY = """
import sys
import numpy as np
from toolkit.api import Embedder
from toolkit.errors import ToolkitError
out, paths = sys.argv[1], sys.argv[2:]
rows = ["The capital of China is Beijing.", "Gravity pulls things toward each other."]
outputs = [Embedder.from_artifacts(path).encode_documents(rows) for path in paths]
assert "torch" not in sys.modules, "running artifacts imported PyTorch"
assert "transformers" not in sys.modules, "running artifacts imported transformers"
assert not any("libtvm_compiler" in line for line in open("/proc/self/maps")), "TVM's compiler library was loaded"
np.save(out, np.stack(outputs))
try:
    import toolkit.tvm_compile
    raise AssertionError("compiling after running an artifact was not refused")
except ToolkitError as e:
    assert "TVM_USE_RUNTIME_LIB=0" in str(e), e
import torch  # still importable, and the artifacts still run beside it
for path, before in zip(paths, outputs):
    np.testing.assert_array_equal(Embedder.from_artifacts(path).encode_documents(rows), before)
"""


def test_a_process_that_only_runs_artifacts_imports_only_what_running_takes(tvm_artifacts, onnx_artifacts, tmp_path):
    # unused and resident: PyTorch (250 MB: tvm_ffi imports it when it is installed, and so does AutoTokenizer),
    # transformers (40 MB) and TVM's compiler library (110 MB, LLVM included)
    from toolkit.api import Embedder

    artifacts = [str(tvm_artifacts["embedding"][0]), str(onnx_artifacts["embedding"][0])]
    run_as_a_user_would(RUNS_ARTIFACTS_ONLY, tmp_path / "out.npy", *artifacts)
    rows = ["The capital of China is Beijing.", "Gravity pulls things toward each other."]
    here = np.stack([Embedder.from_artifacts(path).encode_documents(rows) for path in artifacts])  # full TVM library
    np.testing.assert_array_equal(np.load(tmp_path / "out.npy"), here)


COMPILES_TVM = """
import sys
from pathlib import Path
from toolkit.artifact import Manifest
from toolkit.compile import compile_config
from toolkit.config import BuildConfig
from toolkit.memory import resident_mb
cfg = BuildConfig(name="lean", task="embedding", checkpoint=sys.argv[1], seq_lens=(32,), batch=1, backends=("tvm",),
                  workspace=Path(sys.argv[2]))
[artifact] = compile_config(cfg, log=lambda m: None)
assert not any("libtvm_compiler" in line for line in open("/proc/self/maps")), "compiling loaded TVM's compiler here"
manifest = Manifest.load(artifact)
assert manifest.validation["passed"], manifest.validation
# the stage counts its build process (TVM's compiler alone is ~190 MB resident) on top of this process
assert manifest.build["stage_peak_rss_mb"]["tvm"] > resident_mb() + 100, (manifest.build, resident_mb())
"""


def test_compile_builds_tvm_in_a_process_of_its_own_and_counts_it(checkpoints, tmp_path):
    # what TVM's compiler leaves resident would otherwise sit under validation's load of the artifact
    run_as_a_user_would(COMPILES_TVM, checkpoints["embedding"], tmp_path)


def run_as_a_user_would(script: str, *args) -> None:
    """Run `script` in a new Python process where TVM's library is left to the toolkit (conftest fixes it for this
    process)."""
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TVM_USE_RUNTIME_LIB"}
    subprocess.run([sys.executable, "-c", script, *map(str, args)], check=True, timeout=600, env=env)
