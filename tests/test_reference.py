"""LayerwiseReference: the unpatched Hugging Face computation with one decoder layer's weights resident at a time."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from toolkit.backends import LayerwiseReference, TorchReference
from toolkit.errors import ToolkitError
from toolkit.tasks import TASKS
from toolkit.text import left_pad
from toolkit.tokenizer import ENDOFTEXT_ID

SEQ = 48
SENTENCE = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."


def batch(tokenizer):
    """Left-padded edge cases: one real token in a row of padding, a sentence, and a row with no padding at all."""
    sentence = tokenizer.encode_one(SENTENCE)
    full = (sentence * SEQ)[: SEQ - 1]
    return left_pad([[ENDOFTEXT_ID], sentence + [ENDOFTEXT_ID], full + [ENDOFTEXT_ID]], SEQ, ENDOFTEXT_ID)


def materialised(module) -> bool:
    return any(p.device.type != "meta" for p in module.parameters())


def assert_same(checkpoint, task, tokenizer):
    ids, mask = batch(tokenizer)
    whole = TorchReference(checkpoint, TASKS[task]).run(ids, mask)
    layerwise = LayerwiseReference(checkpoint, TASKS[task]).run(ids, mask)
    assert layerwise.shape == whole.shape and np.isfinite(layerwise).all()
    np.testing.assert_array_equal(layerwise, whole)  # bit for bit: the same computation, not an approximation


def tensors(checkpoint) -> dict:
    with safe_open(str(checkpoint / "model.safetensors"), "pt") as f:
        return {key: f.get_tensor(key) for key in f.keys()}


def copy_checkpoint(checkpoint, out):
    shutil.copytree(checkpoint, out, ignore=shutil.ignore_patterns("*.safetensors"))
    return out


@pytest.mark.parametrize("task", ["embedding", "reranker"])
def test_layerwise_equals_whole_model(checkpoints, tokenizers, task):
    assert_same(checkpoints[task], task, tokenizers[task])


@pytest.mark.parametrize("task", ["embedding", "reranker"])
def test_one_layer_resident_at_a_time(checkpoints, tokenizers, task):
    reference = LayerwiseReference(checkpoints[task], TASKS[task])
    resident = []  # at each layer's start, after its weights loaded: how many layers hold real weights
    for layer in reference.layers:
        layer.register_forward_pre_hook(lambda *_: resident.append(sum(map(materialised, reference.layers))))
    reference.run(*batch(tokenizers[task]))
    assert resident == [1] * len(reference.layers)
    assert not any(materialised(m) for m in reference.heavy)  # all back on meta after the run
    assert not materialised(reference.model.get_input_embeddings())  # never loaded whole


@pytest.mark.parametrize("task", ["embedding", "reranker"])
def test_sharded_checkpoint(checkpoints, tokenizers, task, tmp_path):
    """Split by hand (bf16 kept) into two shards with an index; the embedding's keys also gain the `model.` prefix
    that a checkpoint saved from AutoModelForCausalLM has."""
    out = copy_checkpoint(checkpoints[task], tmp_path / task)
    stored = {key if key.startswith("model.") else f"model.{key}": t for key, t in tensors(checkpoints[task]).items()}
    shards = {"model-00001-of-00002.safetensors": {k: t for k, t in stored.items() if ".layers.0." in k}}
    shards["model-00002-of-00002.safetensors"] = {k: t for k, t in stored.items() if ".layers.0." not in k}
    for file, part in shards.items():
        save_file(part, str(out / file), metadata={"format": "pt"})
    weight_map = {key: file for file, part in shards.items() for key in part}
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same(out, task, tokenizers[task])


def test_untied_lm_head(checkpoints, tokenizers, tmp_path):
    """A reranker with its own lm_head tensor (tie_word_embeddings false) reads it, not the embedding."""
    out = copy_checkpoint(checkpoints["reranker"], tmp_path / "untied")
    stored = tensors(checkpoints["reranker"])
    stored["lm_head.weight"] = (torch.randn_like(stored["model.embed_tokens.weight"], dtype=torch.float32) * 0.05) \
        .to(torch.bfloat16)
    save_file(stored, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": False}))
    assert_same(out, "reranker", tokenizers["reranker"])


def test_errors_are_one_line(checkpoints, tmp_path):
    source, task = checkpoints["embedding"], TASKS["embedding"]

    truncated = copy_checkpoint(source, tmp_path / "truncated")
    data = (source / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])

    missing = copy_checkpoint(source, tmp_path / "missing")
    save_file({k: t for k, t in tensors(source).items() if k != "layers.1.mlp.up_proj.weight"},
              str(missing / "model.safetensors"), metadata={"format": "pt"})

    llama = copy_checkpoint(source, tmp_path / "llama")
    shutil.copy(source / "model.safetensors", llama / "model.safetensors")
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))

    no_weights = copy_checkpoint(source, tmp_path / "no-weights")

    for checkpoint, message in ((truncated, "cannot read"), (missing, "layers.1.mlp.up_proj.weight"),
                                (llama, "Qwen3"), (no_weights, "has no model weights.*re-download")):
        with pytest.raises(ToolkitError, match=message) as error:
            LayerwiseReference(checkpoint, task)
        assert "\n" not in str(error.value)


def test_validation_reference_runs_rows_together(checkpoints, tokenizers, monkeypatch):
    """Validation runs the reference over many rows per pass (each pass reads every layer from the checkpoint), not
    once per artifact batch; rows come back in their order, as each row's own run gives them."""
    from toolkit import validation

    tokenizer = tokenizers["embedding"]
    sentence = tokenizer.encode_one(SENTENCE)
    rows = [sentence[:n] + [ENDOFTEXT_ID] for n in (9, 1, 17, 4, 12, 0, 6)]  # mixed lengths, out of order
    reference = LayerwiseReference(checkpoints["embedding"], TASKS["embedding"])
    alone = np.concatenate([reference.run(*left_pad([row], len(row), ENDOFTEXT_ID)) for row in rows])
    passes = []
    reference.layers[0].register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
    # lengths 1, 2, 5, 7 | 10, 13 | 18: with 36 tokens a pass, 4 x 7 fit, then 2 x 13 (3 x 18 would not)
    for budget, expected in ((2048, [7]), (36, [4, 2, 1])):
        passes.clear()
        monkeypatch.setattr(validation, "REFERENCE_TOKENS", budget)
        together = validation.reference_outputs(reference, rows)
        assert passes == expected
        np.testing.assert_allclose(together, alone, rtol=0, atol=1e-5)
