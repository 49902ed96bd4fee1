"""`toolkit synth`'s streaming writer: ordinary Hugging Face checkpoints (the files and keys save_pretrained writes,
sharded with an index when asked), outliers where the module docstring puts them, and the bundled build configs."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from toolkit import synth
from toolkit.config import load_build_config
from toolkit.synth import OUTLIER_CHANNELS, OUTLIER_SCALE, SHAPES, inject_outliers, write_synthetic_checkpoint
from toolkit.tasks import TASKS

BUILD_CONFIGS = Path(__file__).resolve().parent.parent / "build_configs"


def tensor_specs(checkpoint: Path) -> dict:
    """name -> (shape, dtype) over every safetensors file of a checkpoint."""
    specs = {}
    for path in checkpoint.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            specs.update({k: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()})
    return specs


def load(checkpoint: Path, task: str):
    """The task's HF model from `checkpoint`, asserting transformers found every key and nothing else."""
    model, info = TASKS[task].hf_model_class().from_pretrained(str(checkpoint), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")), info
    return model


@pytest.mark.parametrize("task,tied", [("embedding", True), ("reranker", True), ("reranker", False)])
def test_synth_writes_what_save_pretrained_writes_and_transformers_loads_it_cleanly(task, tied, checkpoints,
                                                                                   tmp_path, monkeypatch):
    if tied:
        ours = checkpoints[task]
    else:  # the 8B layout (own lm_head.weight) on the tiny shape
        monkeypatch.setitem(SHAPES, "tiny-untied", {**SHAPES["tiny"], "tie_word_embeddings": False})
        ours = write_synthetic_checkpoint(tmp_path / "ours", task, "tiny-untied")
    cfg = json.loads((ours / "config.json").read_text())
    assert cfg.pop("synthetic")["task"] == task
    # The reference: the same config through from_config + save_pretrained (only affordable on a tiny shape).
    from transformers import Qwen3Config

    reference = tmp_path / "reference"
    TASKS[task].hf_model_class().from_config(Qwen3Config(**cfg)).to(torch.bfloat16).save_pretrained(reference)
    assert tensor_specs(ours) == tensor_specs(reference)
    assert cfg == json.loads((reference / "config.json").read_text())
    assert sorted(p.name for p in ours.glob("*.json")) == sorted(
        [p.name for p in reference.glob("*.json")] + ["tokenizer.json", "tokenizer_config.json"])
    if (reference / "generation_config.json").exists():
        assert (ours / "generation_config.json").read_text() == (reference / "generation_config.json").read_text()

    model = load(ours, task)
    if task == "reranker":
        head, embeddings = model.lm_head.weight, model.get_input_embeddings().weight
        assert ("lm_head.weight" in tensor_specs(ours)) is not tied
        assert (head is embeddings) if tied else not torch.equal(head, embeddings)


def test_synth_shards_with_an_index_that_transformers_loads_to_the_same_tensors(checkpoints, tmp_path):
    limit = 60_000  # bytes: the embedding gets a shard of its own, the layers spread over several
    sharded = write_synthetic_checkpoint(tmp_path / "sharded", "reranker", "tiny", max_shard_bytes=limit)
    assert not (sharded / "model.safetensors").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in sharded.glob("*.safetensors"))
    n = len(files)
    assert n >= 3 and files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(set(index["weight_map"].values())) == files
    specs = tensor_specs(sharded)
    assert set(index["weight_map"]) == set(specs) == set(tensor_specs(checkpoints["reranker"]))
    nbytes = {k: 2 * torch.Size(shape).numel() for k, (shape, dtype) in specs.items() if dtype == "BF16"}
    assert len(nbytes) == len(specs) and index["metadata"]["total_size"] == sum(nbytes.values())
    for name in files:
        with safe_open(sharded / name, "pt") as f:
            keys = set(f.keys())
        assert keys == {k for k, v in index["weight_map"].items() if v == name}
        assert len(keys) == 1 or sum(nbytes[k] for k in keys) <= limit

    expected, got = load(checkpoints["reranker"], "reranker"), load(sharded, "reranker")
    assert all(torch.equal(a, b) for a, b in zip(expected.state_dict().values(), got.state_dict().values(),
                                                 strict=True))

    write_synthetic_checkpoint(sharded, "reranker", "tiny")  # over it, unsharded: no stale shard or index is left
    assert sorted(p.name for p in sharded.glob("model*")) == ["model.safetensors"]


def test_synth_outlier_channels_in_every_layer_leave_the_function_unchanged(checkpoints, outlier_checkpoints):
    # On the written checkpoint: every layer's two norms carry the scaled channels, every reader's columns the inverse.
    model = load(outlier_checkpoints["embedding"], "embedding")
    for layer in model.layers:
        for norm, readers in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj,
                                                       layer.self_attn.v_proj)),
                              (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
            w = norm.weight.float().abs()
            others = [c for c in range(len(w)) if c not in OUTLIER_CHANNELS]
            assert w[list(OUTLIER_CHANNELS)].min() > 20 * w[others].max()
            for reader in readers:
                col = reader.weight.float().abs().mean(0)
                assert col[list(OUTLIER_CHANNELS)].max() < col.mean() / 10
    # And the transformation itself, on a whole model's weights, leaves its fp32 function alone (no delimiter token
    # in the input, so the massive embedding rows are not read).
    plain = load(checkpoints["embedding"], "embedding").float()
    ids = torch.tensor([[9707, 1879, 3319, 151643]])
    with torch.no_grad():
        before = plain(input_ids=ids).last_hidden_state
        norm_before = plain.layers[1].post_attention_layernorm.weight.clone()
        inject_outliers(dict(plain.named_parameters()))
        after = plain(input_ids=ids).last_hidden_state
    assert torch.allclose(plain.layers[1].post_attention_layernorm.weight[list(OUTLIER_CHANNELS)],
                          norm_before[list(OUTLIER_CHANNELS)] * OUTLIER_SCALE)
    assert torch.allclose(before, after, rtol=1e-4, atol=1e-4)


def test_synth_cli_offers_every_shape():
    from toolkit.cli import synth as synth_command

    [shape] = [p for p in synth_command.params if p.name == "shape"]
    assert list(shape.type.choices) == list(synth.SHAPES) == ["tiny", "0.6b", "4b", "8b"]
    assert SHAPES["4b"]["tie_word_embeddings"] and not SHAPES["8b"]["tie_word_embeddings"]


def test_every_bundled_build_config_loads():
    paths = sorted(BUILD_CONFIGS.glob("*.yaml"))
    configs = [load_build_config(p) for p in paths]
    assert len({c.name for c in configs}) == len(configs) == 6
    for path, cfg in zip(paths, configs, strict=True):
        size = cfg.name.split("-")[2]  # qwen3-<task>-<size>-<dtype>
        assert path.name == f"{cfg.task}_config{'' if size == '0.6b' else '_' + size}_{cfg.dtype}.yaml"
        assert cfg.checkpoint == f"Qwen/Qwen3-{cfg.task.capitalize()}-{size.upper()}"
        assert cfg.seq_lens == (512,)


def test_a_path_that_cannot_be_written_is_one_line_naming_it(tmp_path):
    """File system errors on a user's path (here a directory under a regular file) are one line with the path, not a
    traceback; `toolkit compile` checks its workspace before any model work."""
    from click.testing import CliRunner

    from toolkit.cli import main

    blocked = tmp_path / "a-file"
    blocked.write_text("")
    for args in (["synth", "--task", "embedding", str(blocked / "ckpt")],
                 ["compile", "build_configs/embedding_config_fp16.yaml", "--checkpoint", str(blocked / "none"),
                  "--workspace", str(blocked / "ws")]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2 and f"error: cannot use {blocked}" in result.output, result.output
        assert "Traceback" not in result.output


def test_synth_refuses_to_overwrite_what_it_did_not_write(checkpoints, tmp_path, monkeypatch):
    """It used to replace a real checkpoint's weights, write into any non-empty directory, and take "" as the current
    directory; an earlier synthetic checkpoint is still rewritten in place."""
    from click.testing import CliRunner

    from toolkit.cli import main

    real = tmp_path / "real"
    shutil.copytree(checkpoints["embedding"], real)
    config = json.loads((real / "config.json").read_text())
    del config["synthetic"]
    (real / "config.json").write_text(json.dumps(config))
    weights = (real / "model.safetensors").read_bytes()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    monkeypatch.chdir(tmp_path / "other")
    for out, message in ((real, "holds no synthetic checkpoint"), (other, "holds no synthetic checkpoint"),
                         ("", "the output directory is empty")):
        result = CliRunner().invoke(main, ["synth", "--task", "embedding", str(out)])
        assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert (real / "model.safetensors").read_bytes() == weights
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
    again = shutil.copytree(checkpoints["embedding"], tmp_path / "again")  # seed 0's
    assert write_synthetic_checkpoint(again, "embedding", "tiny", seed=1) == again
    fresh = write_synthetic_checkpoint(tmp_path / "fresh", "embedding", "tiny", seed=1)
    rewritten = {p.name: p.read_bytes() for p in again.glob("*.safetensors")}
    assert rewritten == {p.name: p.read_bytes() for p in fresh.glob("*.safetensors")}  # replaced by seed 1's
    assert rewritten["model.safetensors"] != (checkpoints["embedding"] / "model.safetensors").read_bytes()
