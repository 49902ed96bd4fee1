"""fp16 ONNX artifacts against the unpatched Hugging Face model in fp32, and artifact integrity."""
import json
import shutil
from collections import Counter

import numpy as np
import pytest
from click.testing import CliRunner

from toolkit.api import token_rows
from toolkit.artifact import Manifest
from toolkit.backends import TorchReference, open_backend
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.tasks import TASKS
from toolkit.text import left_pad
from toolkit.tokenizer import ENDOFTEXT_ID

from conftest import SEQ_LENS, copy_artifact, model_path, signed

TEXTS = ["a", "What is the capital of China?", "Gravity is a force that attracts two bodies towards each other.",
         "北京是中国的首都。", "Qwen3 " * 40]


def open_artifact(path):
    return open_backend(Manifest.load(path))


def agreement(task, reference_raw, candidate_raw):
    return task.agreement(task.finish(reference_raw), task.finish(candidate_raw))


def run_pairs(backend, reference, tokenizer):
    """TEXTS through the artifact and the reference as the task's bodies: the reranker's with a query and the
    web-search instruction (an artifact caches the prompt up to the query)."""
    task = backend.task
    bodies = [task.body(("Which text is this?", t)) for t in TEXTS] if task.name == "reranker" else TEXTS
    rows = token_rows(task.prompt(tokenizer), tokenizer, bodies, backend.seq_len, truncation="truncate")
    outs, refs = [], []
    for i in range(0, len(rows), backend.batch):
        ids, mask = left_pad(rows[i:i + backend.batch], backend.seq_len, ENDOFTEXT_ID, backend.batch)
        n = len(rows[i:i + backend.batch])
        outs.append(backend.run(ids, mask)[:n])
        refs.append(reference.run(ids[:n], mask[:n]))
    return np.concatenate(refs), np.concatenate(outs)


@pytest.mark.parametrize("name", ["embedding", "reranker"])
def test_fp16_onnx_matches_hf_fp32(onnx_artifacts, checkpoints, tokenizers, name):
    task = TASKS[name]
    reference = TorchReference(checkpoints[name], task)
    for artifact in onnx_artifacts[name]:
        manifest = Manifest.load(artifact)
        assert manifest.dtype == "fp16" and manifest.validation["passed"]
        stats = agreement(task, *run_pairs(open_artifact(artifact), reference, tokenizers[name]))
        assert stats["nonfinite"] == 0 and task.within_tolerance(stats, "fp16")


def test_the_reranker_holds_its_prompt_prefix_and_refuses_rows_without_it(onnx_artifacts, tokenizers):
    task = TASKS["reranker"]
    backend = open_artifact(onnx_artifacts["reranker"][0])
    prefix = task.prompt(tokenizers["reranker"]).prefix
    assert backend.cached_prefix == prefix[:len(backend.cached_prefix)] and len(backend.cached_prefix) >= 36
    with pytest.raises(ToolkitError, match="prompt prefix"):
        backend.run(*left_pad([[9707, ENDOFTEXT_ID]], backend.seq_len, ENDOFTEXT_ID))


def test_artifact_weights_are_stored_fp16(onnx_artifacts):
    import onnx

    model = onnx.load(str(model_path(onnx_artifacts["embedding"][0])))
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)
    float_inits = [i for i in model.graph.initializer if i.data_type in floats and np.prod(i.dims) > 1000]
    assert float_inits and all(i.data_type == onnx.TensorProto.FLOAT16 for i in float_inits)


def test_onnx_runtime_fuses_the_norms_of_an_fp16_artifact_with_its_constant_folding_off(onnx_artifacts, checkpoints,
                                                                                         tmp_path):
    """Compile folds the fp16 graph's small constants (not its weights' casts), so ONNX Runtime finds its fusions as it
    loads fp16 artifacts (constant folding off on CPU: `OnnxRuntimeBackend`): each RMSNorm one kernel, and RoPE is
    exported as one RotaryEmbedding (on q, k and the cached prefix's keys in every layer) where it took seven ops."""
    import onnx
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
    ort.InferenceSession(str(model_path(onnx_artifacts["reranker"][0])), options, providers=["CPUExecutionProvider"],
                         disabled_optimizers=["ConstantFolding"])
    ops = Counter(node.op_type
                  for node in onnx.load(str(tmp_path / "optimized.onnx"), load_external_data=False).graph.node)
    assert ops["SimplifiedLayerNormalization"] and not ops["ReduceMean"]
    layers = json.loads((checkpoints["reranker"] / "config.json").read_text())["num_hidden_layers"]
    assert ops["RotaryEmbedding"] == 3 * layers and not ops["Neg"]


@pytest.mark.parametrize("name", ["embedding", "reranker"])
def test_export_has_no_tensor_sequences(onnx_artifacts, name):
    """The fused q/k/v and gate/up outputs are cut with slices: `split`/`chunk` export as SplitToSequence +
    SequenceAt, which ONNX Runtime runs as copies through a tensor sequence (7% of a 0.6B forward)."""
    import onnx

    model = onnx.load(str(model_path(onnx_artifacts[name][0])), load_external_data=False)
    assert not {n.op_type for n in model.graph.node} & {"SplitToSequence", "SequenceAt"}


@pytest.mark.parametrize("name", ["embedding", "reranker"])
def test_bucket_set_is_one_graph_held_once(onnx_artifacts, tokenizers, name):
    """Every SEQ of an ONNX bucket set is the same graph, with symbolic batch and sequence axes: exported once, the
    same files in every artifact, and one ONNX Runtime session for all of its buckets and instances at run time.
    Each SEQ is still validated and served at its own shape, and answers as it did on its own."""
    import onnx

    from toolkit.api import model_class

    artifacts = onnx_artifacts[name]
    graph = onnx.load(str(model_path(artifacts[0])), load_external_data=False).graph
    assert [[d.dim_param for d in i.type.tensor_type.shape.dim] for i in graph.input] == [["batch", "seq"]] * 2
    manifests = [Manifest.load(a) for a in artifacts]
    # stored once, beside the SEQs: one graph directory in the set, no model file in any SEQ's own directory
    [shared] = artifacts[0].parent.glob("graph-*")
    assert {m.model_file for m in manifests} == {f"../{shared.name}/model.onnx"}
    assert sorted(p.name for p in shared.iterdir()) == ["model.onnx", "model.onnx.data"]
    assert not [p for a in artifacts for p in a.glob("model.onnx*")]
    for file in ("model.onnx", "model.onnx.data"):
        assert len({m.files[f"../{shared.name}/{file}"]["sha256"] for m in manifests}) == 1
    assert all(m.validation["passed"] for m in manifests) and tuple(m.seq_len for m in manifests) == SEQ_LENS[name]
    alone = [open_artifact(a) for a in artifacts]
    assert alone[0].session is alone[1].session
    texts = TEXTS if name == "embedding" else [("a query", t) for t in TEXTS]  # documents cut, never the query
    with model_class(TASKS[name]).from_artifacts(artifacts[0].parent, instances=2, truncation="truncate") as model:
        sessions = {id(b.session) for e in model.runner.engines for b in e.backends}
        assert len(model.runner.engines) == 2 and len(sessions) == 1
        rows = model.tokenize(texts)
        together = model.runner.run(rows)
    for i, row in enumerate(rows):
        bucket = next(b for b in alone if len(row) <= b.seq_len)
        ids, mask = left_pad([row], bucket.seq_len, ENDOFTEXT_ID)
        np.testing.assert_allclose(together[i], bucket.run(ids, mask)[0], atol=1e-5)


def test_corrupted_artifact_is_refused(onnx_artifacts, tmp_path):
    artifact = onnx_artifacts["reranker"][0]
    alone = tmp_path / "alone"  # one SEQ copied out of its set, without the set's shared graph
    shutil.copytree(artifact, alone)
    with pytest.raises(ToolkitError, match="missing .*shared graph: copy or move the whole set directory"):
        open_artifact(alone)
    broken = copy_artifact(artifact, tmp_path)
    model = model_path(broken)
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    with pytest.raises(ToolkitError, match="does not match its manifest"):
        open_artifact(broken)
    result = CliRunner().invoke(main, ["inspect", str(broken)])
    assert result.exit_code == 1 and "sha256 mismatch" in result.output
    ok = CliRunner().invoke(main, ["inspect", str(onnx_artifacts["reranker"][0])])
    assert ok.exit_code == 0 and "0 mismatched" in ok.output and "reranker" in ok.output
    assert "the bucket set's shared graph" in ok.output and "(any 1..2 rows)" in ok.output
    raw = json.loads((broken / "manifest.json").read_text())
    # a hand edit, even one that keeps the fields valid (a failed validation marked passed would load), is refused
    for edit in ({"validation": {**raw["validation"], "passed": True, "min_cosine": 1.0}}, {"seq_len": 16}):
        (broken / "manifest.json").write_text(json.dumps({**raw, **edit}, indent=4))
        with pytest.raises(ToolkitError, match="manifest.json was edited after the build .*restore the file or "
                                               "recompile"):
            open_artifact(broken)
    (broken / "manifest.json").write_text(json.dumps(dict(reversed(raw.items()))))  # key order and indent: no edit
    assert Manifest.load(broken, verify=False).seq_len == raw["seq_len"]
    # values no writer produces, in a manifest whose digest matches (another writer's): caught by the field checks
    for field, value, reason in (("files", {"model.onnx": {"bytes": 1}}, "sha256"),
                                 ("task", "translation", "translation"), ("backend", "tvm", "is not a tvm model")):
        (broken / "manifest.json").write_text(json.dumps(signed({**raw, field: value})))
        with pytest.raises(ToolkitError, match=f"not a valid .* manifest .*{reason}"):
            open_artifact(broken)
        result = CliRunner().invoke(main, ["inspect", str(broken)])  # the diagnostic tool says it in one line too
        assert result.exit_code == 2 and "not a valid" in result.output and "Traceback" not in result.output
    # manifests of earlier formats: before every batch became dynamic (it said `dynamic_batch`), before the weights'
    # digest (a set's SEQs told apart by the checkpoint's path): a one-line recompile
    model = {k: v for k, v in raw["model"].items() if k != "weights_sha256"}
    for old in ({**raw, "format": "qwen3-deploy-artifact/2", "dynamic_batch": True},
                signed({**raw, "format": "qwen3-deploy-artifact/4", "model": model})):
        (broken / "manifest.json").write_text(json.dumps(old))
        with pytest.raises(ToolkitError, match=f"is a '{old['format']}' manifest and this toolkit reads "
                                               "'qwen3-deploy-artifact/5' ones .*; recompile the artifact with "
                                               "`toolkit compile`"):
            open_artifact(broken)
    (broken / "manifest.json").write_text("{not json")
    with pytest.raises(ToolkitError, match="not a valid .* manifest"):
        open_artifact(broken)


def test_a_seq_directory_without_its_manifest_is_refused_as_damaged(onnx_artifacts, tmp_path):
    """A set whose seq64 lost its manifest loaded with seq32 alone, and a longer text was then told to "compile a
    larger SEQ". What a build leaves beside the SEQs is no damage: an empty SEQ directory, a staging directory."""
    from toolkit.api import Embedder
    from toolkit.artifact import find_artifacts

    artifact = copy_artifact(onnx_artifacts["embedding"][1], tmp_path)
    assert artifact.name == "seq64"
    (artifact / "manifest.json").unlink()
    for path in (artifact.parent, artifact):
        with pytest.raises(ToolkitError, match=f"^{artifact} holds files but no manifest.json: its SEQ's artifact is "
                                               r"damaged; compile it again \(compile --seq 64 rebuilds that SEQ alone"):
            Embedder.from_artifacts(path)
    shutil.rmtree(artifact)
    artifact.mkdir()
    staging = artifact.parent / ".seq64.staging-1-x"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"")
    assert [m.seq_len for m in find_artifacts(artifact.parent)] == [32]


def test_fp16_artifact_survives_residuals_beyond_fp16_range(checkpoints, tmp_path):
    """Real Qwen3 checkpoints carry huge residual activations; here layer 0's MLP pushes them past 65504 (fp16 max).
    A plain `.half()` Hugging Face model turns all-NaN (the ollama / llama.cpp failure); our fp16 artifact must not."""
    import torch
    from safetensors.torch import load_file, save_file

    from toolkit.checkpoint import load_hf_model

    from conftest import build

    ckpt = tmp_path / "massive"
    shutil.copytree(checkpoints["embedding"], ckpt)
    weights = load_file(str(ckpt / "model.safetensors"))
    for k in ("layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight"):
        weights[k] = weights[k] * 800  # still representable in fp16 (|w| < 200)
    save_file(weights, str(ckpt / "model.safetensors"), metadata={"format": "pt"})

    ids, mask = left_pad([[ENDOFTEXT_ID], [9707, 1879, ENDOFTEXT_ID]], 32, ENDOFTEXT_ID)
    hf = load_hf_model(ckpt, TASKS["embedding"])
    with torch.no_grad():
        hidden = hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), output_hidden_states=True)
        assert max(h.abs().max().item() for h in hidden.hidden_states) > 65504
        naive = hf.half()(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
        assert not torch.isfinite(naive).all()

    [artifact] = build({"embedding": ckpt}, tmp_path / "ws", "embedding", seq_lens=(32,), batch=1)
    validation = Manifest.load(artifact).validation
    assert validation["nonfinite"] == 0 and validation["min_cosine"] >= 0.999


def test_checkpoint_and_tokenizer_problems_are_named(onnx_artifacts, checkpoints, tmp_path):
    """A set whose local checkpoint moved, an artifact without its tokenizer, a truncated weights file for the torch
    reference, a checkpoint whose weights hold NaN: each a one-line error naming the cause, not a hub lookup, a
    traceback or a failed artifact."""
    import safetensors.torch
    import torch

    from toolkit.checkpoint import load_hf_model, load_tokenizer
    from toolkit.validation import revalidate

    moved = copy_artifact(onnx_artifacts["embedding"][0], tmp_path / "moved")
    manifest = Manifest.load(moved)
    manifest.model = type(manifest.model)(**{**vars(manifest.model), "resolved": str(tmp_path / "gone")})
    manifest.save(moved, hash_files=False)
    with pytest.raises(ToolkitError, match=f"built from the checkpoint {tmp_path / 'gone'}, which is gone; pass the "
                                           "directory it moved to"):
        Manifest.load(moved).reference_checkpoint()
    with pytest.raises(ToolkitError, match=r"no tokenizer at .* \(the directory is missing\)"):
        load_tokenizer(tmp_path / "no-such-tokenizer")
    (tmp_path / "emptied").mkdir()  # e.g. an artifact's tokenizer.json deleted: not transformers' list of formats
    with pytest.raises(ToolkitError, match=r"no tokenizer at .*emptied \(no tokenizer.json or vocab.json\): an "
                                           "artifact's comes with it from `toolkit compile`"):
        load_tokenizer(tmp_path / "emptied")
    truncated = shutil.copytree(checkpoints["embedding"], tmp_path / "truncated")
    weights = next(truncated.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ToolkitError, match="cannot load the Hugging Face model .* re-download or rebuild"):
        load_hf_model(truncated, TASKS["embedding"])
    nan = shutil.copytree(checkpoints["embedding"], tmp_path / "nan")
    tensors = safetensors.torch.load_file(next(nan.glob("*.safetensors")))
    name = next(n for n in tensors if "layers.0" in n and n.endswith("weight") and tensors[n].ndim == 2)
    tensors[name] = torch.full_like(tensors[name], float("nan"))
    safetensors.torch.save_file(tensors, next(nan.glob("*.safetensors")))
    with pytest.raises(ToolkitError, match="the Hugging Face model itself gives non-finite outputs .* its "
                                           "checkpoint's weights hold NaN or Inf"):
        revalidate(moved, str(nan))
