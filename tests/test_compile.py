"""Compile failure paths: atomic artifacts, refused checkpoints and sequence lengths, `toolkit validate`."""
import json
import shutil

import pytest
from click.testing import CliRunner

from toolkit.artifact import Manifest
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.runtime import Engine

from conftest import build


def test_crash_after_the_manifest_leaves_nothing_loadable_and_keeps_the_old_artifact(checkpoints, tmp_path,
                                                                                     monkeypatch):
    import toolkit.compile

    [good] = build(checkpoints, tmp_path, "embedding", seq_lens=(32,), batch=1)
    before = Manifest.load(good)

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash during validation")

    monkeypatch.setattr(toolkit.compile, "measure", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        build(checkpoints, tmp_path, "embedding", seq_lens=(32,), batch=1)
    assert sorted(p.name for p in good.parent.iterdir()) == ["seq32"]  # no staging directory left behind
    after = Manifest.load(good)  # the previous artifact, untouched (hashes verified)
    assert after.files == before.files and after.validation == before.validation


def test_checkpoint_without_tokenizer_files_is_refused_before_building(checkpoints, tmp_path):
    """It used to build an artifact whose empty tokenizer mapped every text to [151643], then crash in validation
    with ZeroDivisionError, leaving an unvalidated artifact that loaded and ran."""
    ckpt = tmp_path / "no-tokenizer"
    shutil.copytree(checkpoints["embedding"], ckpt)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (ckpt / name).unlink()
    result = CliRunner().invoke(main, ["compile", "build_configs/embedding_config_fp16.yaml", "--checkpoint",
                                       str(ckpt), "--seq", "32", "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2 and "tokenizer" in result.output and "Traceback" not in result.output
    assert not list(tmp_path.rglob("manifest.json"))


def test_unvalidated_artifact_is_refused_by_the_runtime_and_inspect(onnx_artifacts, tmp_path):
    copy = tmp_path / "unvalidated"
    shutil.copytree(onnx_artifacts["embedding"][0], copy)
    manifest = Manifest.load(copy)
    manifest.validation = None
    manifest.save(copy, hash_files=False)
    with pytest.raises(ToolkitError, match="no validation result"):
        Engine.from_artifact(copy)
    result = CliRunner().invoke(main, ["inspect", str(copy)])
    assert result.exit_code == 1 and "NOT DEPLOYABLE" in result.output


@pytest.mark.parametrize("broken, message", [("llama", "is a 'llama' checkpoint"),
                                             ("truncated", "truncated or corrupt")])
def test_unusable_checkpoints_are_one_line_errors(checkpoints, tmp_path, broken, message):
    ckpt = tmp_path / broken
    shutil.copytree(checkpoints["embedding"], ckpt)
    if broken == "llama":
        config = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    else:
        weights = ckpt / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = CliRunner().invoke(main, ["compile", "build_configs/embedding_config_fp16.yaml", "--checkpoint",
                                       str(ckpt), "--seq", "32", "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output


def test_reranker_seq_that_cannot_hold_the_prompt_is_refused_at_compile(checkpoints, tmp_path):
    """It used to compile; at run time 'truncate' printed a false warning, then failed with '58 tokens do not fit'."""
    with pytest.raises(ToolkitError, match=r"cannot hold a reranker input: its prompt alone takes \d+ tokens"):
        build(checkpoints, tmp_path, "reranker", seq_lens=(48,), batch=1)
    assert not list(tmp_path.rglob("manifest.json"))


def test_validate_command_rechecks_and_records(onnx_artifacts, tmp_path):
    copy = tmp_path / "artifact"
    shutil.copytree(onnx_artifacts["reranker"][0], copy)
    manifest = Manifest.load(copy)
    manifest.validation = {"skipped": "pretend it was built without its device", "passed": None}
    manifest.save(copy, hash_files=False)
    result = CliRunner().invoke(main, ["validate", str(copy)])
    assert result.exit_code == 0, result.output
    assert "max |Δ P(yes)|" in result.output and result.output.rstrip().endswith("OK")
    recorded = Manifest.load(copy).validation
    assert recorded["passed"] is True and recorded["max_abs_diff"] <= 1e-2 and recorded["items"] == 3
