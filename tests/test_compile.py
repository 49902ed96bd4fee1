"""Compile failure paths: atomic artifacts, refused checkpoints and sequence lengths, `toolkit validate`."""
import json
import shutil
import time
import warnings
from dataclasses import replace
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from toolkit.artifact import Manifest
from toolkit.cli import main
from toolkit.config import BuildConfig
from toolkit.errors import ToolkitError
from toolkit.runtime import Engine
from toolkit.synth import write_synthetic_checkpoint
from toolkit.tasks import TASKS, WEB_SEARCH_INSTRUCTION

from conftest import build, copy_artifact, signed

TIMEOUT = 300  # seconds: a bound on waits for a compile that only a hang reaches

def test_crash_after_the_manifest_leaves_nothing_loadable_and_keeps_the_old_artifact(checkpoints, outlier_checkpoints,
                                                                                     tmp_path, monkeypatch):
    """A set of two SEQs (one shared ONNX graph). A rebuild from other weights that crashes in the second SEQ's
    validation (the first passed) leaves the old set as it was, without the new graph: no SEQ of it is installed
    before all are validated. One that succeeds replaces the old graph, which is then removed; a later build of one
    SEQ from other weights removes the set's other SEQ (it would run other weights), and a set mixed by hand is
    refused."""
    import toolkit.validation
    from toolkit.artifact import find_artifacts

    good = build(checkpoints, tmp_path, "embedding", seq_lens=(32, 48), batch=1)
    set_dir = good[0].parent
    before = [Manifest.load(a) for a in good]
    [old_graph] = set_dir.glob("graph-*")
    measured = []

    def crash_on_the_second(*args, **kwargs):
        measured.append(args[0].seq_len)
        if len(measured) == 2:
            raise RuntimeError("simulated crash during validation")
        return measure(*args, **kwargs)

    measure = toolkit.validation.measure
    with monkeypatch.context() as patch:
        patch.setattr(toolkit.validation, "measure", crash_on_the_second)
        with pytest.raises(RuntimeError, match="simulated crash"):
            build(outlier_checkpoints, tmp_path, "embedding", seq_lens=(32, 48), batch=1)
    assert measured == [32, 48]
    # no staging directory and no new graph left behind
    assert sorted(p.name for p in set_dir.iterdir()) == sorted([old_graph.name, "seq32", "seq48"])
    after = [Manifest.load(a) for a in good]  # the previous artifacts, untouched (hashes verified)
    assert [(m.files, m.validation) for m in after] == [(m.files, m.validation) for m in before]

    build(outlier_checkpoints, tmp_path, "embedding", seq_lens=(32, 48), batch=1)
    [new_graph] = set_dir.glob("graph-*")
    assert new_graph != old_graph and {Manifest.load(a).model_file for a in good} == {f"../{new_graph.name}/model.onnx"}

    build(checkpoints, tmp_path, "embedding", seq_lens=(48,), batch=1)
    assert [m.seq_len for m in find_artifacts(set_dir)] == [48]  # seq32 held the outlier checkpoint's weights
    build(checkpoints, tmp_path, "embedding", seq_lens=(32,), batch=1)  # the same weights: the set grows
    assert [m.seq_len for m in find_artifacts(set_dir)] == [32, 48]
    manifest_file = set_dir / "seq32" / "manifest.json"
    raw = json.loads(manifest_file.read_text())
    raw["model"]["weights_sha256"] = Manifest.load(good[1]).model.weights_sha256[::-1]
    manifest_file.write_text(json.dumps(signed(raw)))
    with pytest.raises(ToolkitError, match="mixes artifacts of different .*checkpoint"):
        find_artifacts(set_dir)


def test_a_checkpoint_re_saved_in_place_holds_other_weights_and_one_moved_the_same(checkpoints, tmp_path):
    """The set's key was the checkpoint's path: a directory re-saved with other weights kept the SEQs built from the
    old ones, and which weights answered depended on a text's length. Now the weights' digest is the key."""
    from toolkit.artifact import find_artifacts

    ckpt = shutil.copytree(checkpoints["embedding"], tmp_path / "ckpt")
    [first] = build({"embedding": ckpt}, tmp_path / "ws", "embedding", seq_lens=(32,), batch=1)
    write_synthetic_checkpoint(ckpt, "embedding", "tiny", seed=5)  # the same directory, other weights
    build({"embedding": ckpt}, tmp_path / "ws", "embedding", seq_lens=(48,), batch=1)
    assert [m.seq_len for m in find_artifacts(first.parent)] == [48]
    moved = shutil.move(ckpt, tmp_path / "moved")  # the same weights elsewhere: the same set, which grows
    build({"embedding": moved}, tmp_path / "ws", "embedding", seq_lens=(32,), batch=1)
    assert [m.seq_len for m in find_artifacts(first.parent)] == [32, 48]


def test_a_failed_build_leaves_no_directory_it_made(checkpoints, tmp_path):
    """A mistyped checkpoint left WORKSPACE/NAME behind, empty; a workspace that was there stays."""
    cfg = BuildConfig(name="x", task="embedding", checkpoint=str(tmp_path / "nope"), seq_lens=(32,),
                      workspace=tmp_path / "new" / "ws")
    from toolkit.compile import compile_config

    with pytest.raises(ToolkitError, match="nope"):
        compile_config(cfg, log=lambda m: None)
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "kept").mkdir()
    with pytest.raises(ToolkitError, match="nope"):
        compile_config(replace(cfg, workspace=tmp_path / "kept"), log=lambda m: None)
    assert list(tmp_path.iterdir()) == [tmp_path / "kept"] and not any((tmp_path / "kept").iterdir())


def test_a_tvm_build_killed_for_memory_is_reported_and_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    import toolkit.compile

    monkeypatch.setattr(toolkit.compile, "TVM_BUILD_PROCESS", "import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
    with pytest.raises(ToolkitError, match=r"seq32 was killed by SIGKILL \(the kernel's out-of-memory killer"):
        build(checkpoints, tmp_path, "embedding", backends=("tvm",), seq_lens=(32,), batch=1)
    assert list(tmp_path.iterdir()) == []  # no staging, no export left, nor the set's directories the build made


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
    copy = copy_artifact(onnx_artifacts["embedding"][0], tmp_path)
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
    copy = copy_artifact(onnx_artifacts["reranker"][0], tmp_path)
    manifest = Manifest.load(copy)
    manifest.validation = {"skipped": "pretend it was built without its device", "passed": None}
    manifest.save(copy, hash_files=False)
    result = CliRunner().invoke(main, ["validate", str(copy)])
    assert result.exit_code == 0, result.output
    assert "max |Δ P(yes)|" in result.output and result.output.rstrip().endswith("OK")
    recorded = Manifest.load(copy).validation
    assert recorded["passed"] is True and recorded["max_abs_diff"] <= 1e-2 and recorded["items"] == 3


def test_validate_refuses_the_other_tasks_checkpoint_and_warns_of_another_than_the_builds(onnx_artifacts, checkpoints,
                                                                                          tmp_path):
    """The other task's checkpoint would fail the artifact and replace its record: refused before anything runs.
    Another checkpoint of its task is warned about (a failure would be those weights')."""
    import shutil

    copy = copy_artifact(onnx_artifacts["reranker"][0], tmp_path)
    before = Manifest.load(copy).validation
    result = CliRunner().invoke(main, ["validate", str(copy), "--checkpoint", str(checkpoints["embedding"])])
    assert result.exit_code == 2 and "is a synthetic embedding checkpoint and" in result.output, result.output
    assert Manifest.load(copy).validation == before
    elsewhere = shutil.copytree(checkpoints["reranker"], tmp_path / "same-weights-elsewhere")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the build's weights at another path: nothing to warn about
        result = CliRunner().invoke(main, ["validate", str(copy), "--checkpoint", str(elsewhere)])
    assert result.exit_code == 0, result.output
    other = write_synthetic_checkpoint(tmp_path / "other", "reranker", "tiny", seed=5)
    with pytest.warns(UserWarning, match=f"^validating against {other}, but {copy} was built from"):
        CliRunner().invoke(main, ["validate", str(copy), "--checkpoint", str(other)])
    # the build's own path, re-saved with other weights since: said so, though no --checkpoint was passed
    manifest = Manifest.load(copy)
    manifest.model = replace(manifest.model, resolved=str(other))
    manifest.save(copy, hash_files=False)
    with pytest.warns(UserWarning, match=f"^the weights at {other} changed since {copy} was built"):
        CliRunner().invoke(main, ["validate", str(copy)])


def test_the_reranker_caches_the_longest_prompt_prefix_that_keeps_bodies_in_whole_row_tiles(tokenizers):
    """Its 39-token chat prefix: SEQs that are multiples of 4 keep 36 tokens' keys and values (bodies of whole
    4-row register tiles); SEQs 4k+3 all 39; mixed, what most SEQs are aligned for. With the web-search instruction
    the prompt start is 60 tokens (its 21 up to the query); a cache that stops before them leaves any instruction
    open. The embedding has no prefix."""
    from toolkit.compile import cached_prefix, ragged_bodies

    tokenizer, task = tokenizers["reranker"], TASKS["reranker"]
    prefix, start = task.prompt(tokenizer).prefix, task.prompt_start(tokenizer, WEB_SEARCH_INSTRUCTION)
    assert len(prefix) == 39 and len(start) == 60 and start[:39] == prefix
    assert cached_prefix(task, tokenizer, [144, 168, 416]) == (prefix[:36], None)
    assert cached_prefix(task, tokenizer, [143, 259]) == (prefix, None)
    assert cached_prefix(task, tokenizer, [144, 170, 174]) == (prefix[:38], None)
    assert ragged_bodies([144, 170, 174], 38) == [144]  # what compile warns about
    assert cached_prefix(task, tokenizer, [144, 168, 416], WEB_SEARCH_INSTRUCTION) == (start, WEB_SEARCH_INSTRUCTION)
    assert cached_prefix(task, tokenizer, [143, 259], WEB_SEARCH_INSTRUCTION) == (start[:59], WEB_SEARCH_INSTRUCTION)
    assert cached_prefix(TASKS["embedding"], tokenizers["embedding"], [32, 64]) == ([], None)
    query_start = TASKS["embedding"].prompt_start(tokenizers["embedding"], "x")  # "Instruct: x\nQuery": 6 tokens
    assert cached_prefix(TASKS["embedding"], tokenizers["embedding"], [32, 64], "x") == (query_start[:4], "x")


@pytest.mark.parametrize("task_name", ["embedding", "reranker"])
def test_validation_rows_end_with_the_tasks_prompt_suffix(tokenizers, task_name):
    """Every validation row ended with <|endoftext|>, the embedding's suffix: the reranker's gate checked its scores
    at a last position it never scores (its inputs end with the assistant turn's empty think block)."""
    from toolkit.validation import validation_rows

    task, tokenizer = TASKS[task_name], tokenizers[task_name]
    start, suffix = task.prompt_start(tokenizer, WEB_SEARCH_INSTRUCTION), task.prompt(tokenizer).suffix
    rows = validation_rows(task, tokenizer, 128, start)
    assert len(rows[0]) == len(start) + len(suffix) and len(rows[1]) < 128 and len(rows[2]) == 128
    for row in rows:
        assert row[:len(start)] == start and row[-len(suffix):] == suffix


def test_the_instruction_is_cached_where_every_seq_holds_it_with_a_body(tokenizers):
    """The reranker's default (web-search) instruction is cached unless a SEQ is too short for it with a query and a
    document (then only the chat prefix, said in the log); an instruction the config names must fit (or the build is
    refused with the fix); --no-cache-instruction caches none. An embedding set has one only when it is named (a set
    for queries)."""
    from toolkit.compile import instruction_to_cache

    def to_cache(cfg, log=print):
        task = TASKS[cfg.task]
        return instruction_to_cache(cfg, task, tokenizers[cfg.task], task.fixed_instruction(cfg.instruction), log)

    logged = []
    cfg = BuildConfig(name="r", task="reranker", checkpoint="x", seq_lens=(128, 256))
    assert to_cache(cfg, logged.append) == WEB_SEARCH_INSTRUCTION
    assert to_cache(replace(cfg, instruction="Judge")) == "Judge"
    assert to_cache(replace(cfg, cache_instruction=False)) is None
    short = replace(cfg, seq_lens=(64, 128))
    assert to_cache(short, logged.append) is None
    assert logged == ["SEQ 64 cannot hold the default instruction with a body (75 tokens): only the chat prefix is "
                      "cached, and inputs may carry any instruction"]
    with pytest.raises(ToolkitError, match="use --seq 75 or more, or --no-cache-instruction"):
        to_cache(replace(short, instruction=WEB_SEARCH_INSTRUCTION))
    # no SEQ holds the default instruction: the set could run no input that carries it (it compiled, then every
    # pair failed, first with advice to truncate)
    with pytest.raises(ToolkitError, match=r"^no SEQ of 64 holds a reranker input with the instruction 'Given a web "
                                           r".*\(75 tokens .*\): use --seq 75 or more, --instruction with a shorter "
                                           r"one, or --no-cache-instruction"):
        to_cache(replace(cfg, seq_lens=(64,)))
    assert to_cache(replace(cfg, seq_lens=(64,), cache_instruction=False)) is None  # any instruction: short ones fit
    embedding = BuildConfig(name="e", task="embedding", checkpoint="x", seq_lens=(32,))
    assert to_cache(embedding) is None
    assert to_cache(replace(embedding, instruction="Find")) == "Find"


def compile_cli(checkpoint, workspace, *args):
    return CliRunner().invoke(main, ["compile", "build_configs/embedding_config_fp16.yaml", "--checkpoint",
                                     str(checkpoint), "--workspace", str(workspace), *args])


def test_a_dtype_override_names_the_set_after_its_dtype(checkpoints, tmp_path, monkeypatch):
    """`--dtype int8` used to build into the fp16 set's name, removing its SEQs as another build's."""
    import toolkit.compile

    built = []
    monkeypatch.setattr(toolkit.compile, "compile_config", lambda cfg, log: built.append(cfg.name) or [])
    for args in (["--dtype", "int8"], ["--dtype", "fp16"], ["--dtype", "int8", "--name", "mine"], []):
        assert compile_cli(checkpoints["embedding"], tmp_path, "--seq", "32", *args).exit_code == 0
    assert built == ["qwen3-embedding-0.6b-int8", "qwen3-embedding-0.6b-fp16", "mine", "qwen3-embedding-0.6b-fp16"]


@pytest.mark.parametrize("args, message", [
    (["--name", ".."], "one plain directory name"), (["--name", ""], "one plain directory name"),
    (["--name", "a/b"], "one plain directory name"), (["--seq", ""], "comma-separated integers"),
    (["--seq", "32,,64"], "comma-separated integers"),
])
def test_names_outside_the_workspace_and_malformed_sizes_are_refused(checkpoints, tmp_path, args, message):
    """`--name ..` wrote beside the workspace, `--name ""` into its root; `--seq ""` built the config's 512, `32,,64`
    passed."""
    result = compile_cli(checkpoints["embedding"], tmp_path / "ws", *(["--seq", "32"] if "--seq" not in args else []),
                         *args)
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output
    assert not list(tmp_path.rglob("manifest.json"))


def test_seqs_over_the_context_or_the_memory_are_refused_before_building(checkpoints, tmp_path, monkeypatch):
    """SEQ 32768 at batch 2 passed, then crashed in validation allocating 34 GB; SEQs above the checkpoint's
    max_position_embeddings were checked against a fixed 32768 only."""
    short = shutil.copytree(checkpoints["embedding"], tmp_path / "short")
    config = json.loads((short / "config.json").read_text())
    (short / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 48}))
    result = compile_cli(short, tmp_path / "ws", "--seq", "32,64")
    assert result.exit_code == 2 and "longer than the checkpoint's context (48 tokens" in result.output
    # attention scores at SEQ 256: 4 MB
    monkeypatch.setattr("psutil.virtual_memory", lambda: SimpleNamespace(available=10**6))
    result = compile_cli(checkpoints["embedding"], tmp_path / "ws", "--seq", "32,256", "--batch", "4",
                         "--batch-tokens", "128")  # a budget below a SEQ builds it at batch 1: said, not silent
    assert "--batch-tokens 128 is below SEQ 256: built at batch 1" in result.output
    assert result.exit_code == 2 and "SEQ 256 at batch 1 needs" in result.output, result.output
    assert not list(tmp_path.rglob("manifest.json"))


def test_seq_auto_leaves_out_a_rare_very_long_row(checkpoints, tmp_path):
    """One very long text made --seq auto pick SEQ 32768."""
    from toolkit.buckets import AUTO_MAX_SEQ, suggest_for_dataset

    rows = [{"sentence1": "a short one", "sentence2": "another short one", "score": 1.0}] * 5
    rows.append({"sentence1": "word " * 20000, "sentence2": "short", "score": 2.0})
    data = tmp_path / "lengths.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged = []
    seq_lens = suggest_for_dataset("embedding", str(checkpoints["embedding"]), str(data), log=logged.append)
    assert max(seq_lens) == AUTO_MAX_SEQ and "1 of 12 rows" in logged[0] and "truncation policy" in logged[0]


def as_released(checkpoint, directory):
    """A copy of a synthetic checkpoint as Qwen releases it: no synthetic mark, and config.json's `architectures`
    Qwen3ForCausalLM whatever the task (Qwen3-Embedding's too); the weights are laid out as the real ones are (the
    embedding's a bare Qwen3Model's, the reranker's a causal LM's)."""
    copy = shutil.copytree(checkpoint, directory)
    config = json.loads((copy / "config.json").read_text())
    del config["synthetic"]
    (copy / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen3ForCausalLM"]}))
    return copy


@pytest.mark.parametrize("task, other", [("reranker", "embedding"), ("embedding", "reranker")])
def test_a_checkpoint_of_the_other_task_is_refused_naming_the_config(checkpoints, tmp_path, task, other):
    """The embedding config compiled a reranker checkpoint without a word; the reranker config a released
    Qwen3-Embedding checkpoint (its config.json names Qwen3ForCausalLM, as the reranker's does)."""
    ckpt = checkpoints[task] if task == "reranker" else as_released(checkpoints[task], tmp_path / "real")
    result = CliRunner().invoke(main, ["compile", f"build_configs/{other}_config_fp16.yaml", "--checkpoint",
                                       str(ckpt), "--seq", "128", "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2 and f"build_configs/{task}_config_fp16.yaml" in result.output, result.output


def test_a_released_checkpoint_is_told_from_the_other_task_by_its_weights_not_its_architectures(checkpoints,
                                                                                                  tmp_path):
    """Every Qwen3-Embedding build warned that the checkpoint "was saved as a Qwen3ForCausalLM, as Qwen3-Reranker is":
    Qwen3-Embedding's config.json names that class too. A reranker's weights (a causal LM's) under the embedding
    config still get the warning."""
    from toolkit.checkpoint import check_task

    embedding, reranker = (as_released(checkpoints[task], tmp_path / task) for task in ("embedding", "reranker"))
    warned = []
    for checkpoint in (embedding, reranker):
        check_task(TASKS["embedding"], checkpoint, json.loads((checkpoint / "config.json").read_text()),
                   "the config builds embedding artifacts", lambda other: f"compile it as {other}", warned.append)
    assert len(warned) == 1 and warned[0].startswith(f"{reranker} holds a causal LM's weights"), warned
    assert "compile it as reranker, or pass a checkpoint of the embedding task" in warned[0]


def test_inspect_describes_what_the_artifacts_backend_computes(onnx_artifacts):
    """An ONNX Runtime artifact's precision line described TVM's compute (AMX bf16x3 linear layers)."""
    from toolkit.compile import precision
    from toolkit.quantize import TVM_INT8, Int8Scheme

    result = CliRunner().invoke(main, ["inspect", str(onnx_artifacts["embedding"][0])])
    [line] = [line for line in result.output.splitlines() if line.startswith("precision")]
    assert "ONNX Runtime" in line and "float16 weights to float32" in line and "TVM" not in line, line
    assert "bf16x3" in precision("tvm", "fp16")["compute"] and "TVM" not in precision("onnx", "fp32")["compute"]
    onnx_int8 = precision("onnx", "int8", Int8Scheme(per_token=False, unsigned_weights=True))
    assert onnx_int8["weights"].startswith("uint8 (linear layers, per output channel, zero point 128)")
    assert "uint8 x uint8 (linear layers: ONNX Runtime's MatMulInteger, fused into DynamicQuantizeMatMul; dynamic " \
           "activation scale per tensor)" in onnx_int8["compute"] and "TVM" not in onnx_int8["compute"]
    assert "per token" in precision("tvm", "int8", TVM_INT8)["compute"]


@pytest.mark.parametrize("args, message", [
    (["--backend", "onnx"], "ONNX Runtime computes them in float32 alone: leave it out, or add --backend tvm"),
    (["--backend", "tvm", "--dtype", "bf16"], "a bf16 build's linear layers are all bf16 x bf16"),
    (["--backend", "tvm", "--target", "cuda"], "TVM's CUDA kernels compute them in float32 alone"),
])
def test_fp32_linears_is_refused_where_it_changes_nothing(checkpoints, tmp_path, monkeypatch, args, message):
    """`--backend onnx --fp32-linears fma` built as if it were not there. A TVM CPU build of fp16 (or int8: its layers
    kept out of int8) weights takes it."""
    import toolkit.compile

    built = []
    monkeypatch.setattr(toolkit.compile, "compile_config", lambda cfg, log: built.append(cfg.fp32_linears) or [])
    result = compile_cli(checkpoints["embedding"], tmp_path, "--seq", "32", "--fp32-linears", "fma", *args)
    assert result.exit_code == 2 and f"--fp32-linears chooses how TVM computes fp16/fp32-weight linear layers on " \
        f"CPU, and {message}" in result.output and "Traceback" not in result.output, result.output
    for dtype in ("fp16", "int8"):
        result = compile_cli(checkpoints["embedding"], tmp_path, "--seq", "32", "--fp32-linears", "fma", "--backend",
                             "all", "--dtype", dtype)
        assert result.exit_code == 0, result.output
    assert built == ["fma", "fma"]


@pytest.mark.parametrize("dtype, feature, instead", [("bf16", "avx512_bf16", "--dtype fp16"),
                                                     ("int8", "avx512_vnni", "--backend onnx")])
def test_tvm_bf16_or_int8_on_a_cpu_without_its_instructions_is_refused_up_front(checkpoints, tmp_path, monkeypatch,
                                                                                dtype, feature, instead):
    """TVM's bf16 / int8 kernels are AVX512-BF16 / VNNI instructions: on a CPU without them the build is refused
    before any model work, naming what to build instead."""
    import toolkit.compile
    import toolkit.host

    flags = toolkit.host.cpu_flags() or frozenset()
    monkeypatch.setattr(toolkit.host, "cpu_flags", lambda: flags - {feature})
    monkeypatch.setattr(toolkit.compile, "load_streamed", lambda *a: pytest.fail("the build loaded the model"))
    result = compile_cli(checkpoints["embedding"], tmp_path, "--seq", "32", "--backend", "tvm", "--dtype", dtype)
    assert result.exit_code == 2 and result.output == (
        f"error: this CPU has no {feature} (see /proc/cpuinfo): TVM {dtype} artifacts are built on and for CPUs that "
        f"have it; use {instead} here\n"), result.output
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []


def test_inspect_json_prints_only_the_manifest_on_stdout(onnx_artifacts):
    result = CliRunner().invoke(main, ["inspect", str(onnx_artifacts["embedding"][0]), "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["task"] == "embedding"
    assert "files: " in result.stderr


def test_a_later_build_removes_staging_left_by_a_killed_one(tmp_path):
    """Staging directories, TVM exports and graphs on their way whose build process is gone (or an older toolkit's,
    named without one); those of a build running now stay, and so does anything else."""
    import os

    from toolkit.artifact_set import build_dir, remove_stale_staging

    dead = [tmp_path / name for name in (".seq32.staging-999999999-ab", ".export-999999999-cd",
                                         ".graph-staging-999999999-ef", ".export-k2j4_x9a")]
    kept = [tmp_path / name for name in (f".seq64.staging-{os.getpid()}-cd", ".cache", "seq32")]
    for directory in dead + kept:
        directory.mkdir()
    kept.append(build_dir(tmp_path, "export"))
    logged = []
    remove_stale_staging(tmp_path, logged.append)
    assert not any(d.exists() for d in dead) and all(d.exists() for d in kept)
    assert sorted(logged) == sorted(f"removed {d}: left by an interrupted build" for d in dead)


def test_a_killed_tvm_builds_export_stays_while_it_runs_and_goes_with_the_next_build(checkpoints, tmp_path):
    """A SIGKILLed TVM build left its `.export-*` graph directory (the whole exported model) for good."""
    import subprocess
    import sys

    from toolkit.artifact_set import remove_stale_staging

    ws = tmp_path / "ws"
    set_dir = ws / "qwen3-embedding-0.6b-fp16" / "tvm"
    process = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "compile",
                                "build_configs/embedding_config_fp16.yaml", "--checkpoint",
                                str(checkpoints["embedding"]), "--seq", "32", "--backend", "tvm", "--workspace",
                                str(ws)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while process.poll() is None and not list(set_dir.glob(".export-*/*")):
            time.sleep(0.1)  # until the build has written into its export directory
        assert process.poll() is None
        remove_stale_staging(set_dir, print)  # another build starting now
        left = sorted(p.name for p in set_dir.iterdir())
        assert [name.split("-")[0] for name in left] == [".export", ".seq32.staging"], left
    finally:
        process.kill()
        process.wait()
    assert sorted(p.name for p in set_dir.iterdir()) == left  # SIGKILL: no cleanup ran
    remove_stale_staging(set_dir, print)
    assert list(set_dir.iterdir()) == []


@pytest.mark.parametrize("signal_name, status", [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_during_compile_cleans_up_and_exits_128_plus_its_number(checkpoints, tmp_path, signal_name, status):
    """`timeout 20 toolkit compile` left full-size staging directories and an orphan graph directory; Ctrl-C exited 1
    with click's `Aborted!`, which a script cannot tell from a failed build."""
    import signal
    import subprocess
    import sys

    ws = tmp_path / "ws"
    process = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "compile",
                                "build_configs/embedding_config_fp16.yaml", "--checkpoint",
                                str(checkpoints["embedding"]), "--seq", "32,64", "--workspace", str(ws)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               # a shell's background job inherits SIGINT ignored; Python then never raises on it
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + TIMEOUT
        while process.poll() is None and not list(ws.glob("*/onnx/.seq*.staging-*/*")):
            assert time.monotonic() < deadline, "the build wrote nothing into a staging directory"
            time.sleep(0.1)  # until the build has written into its staging directory
        assert process.poll() is None  # still building: the signal lands mid-compile
        process.send_signal(getattr(signal, signal_name))
        assert process.wait(TIMEOUT) == status
        stderr = process.stderr.read()
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert "Traceback" not in stderr and "Aborted!" not in stderr, stderr
    if signal_name == "SIGINT":
        assert stderr.splitlines()[-1] == "interrupted: exit 130", stderr
    assert not ws.exists()  # no staging or graph directory left, nor the (then empty) directories the build made


def test_ctrl_c_in_any_command_exits_130_with_one_line():
    """click's default on Ctrl-C: `Aborted!` and exit 1, the status of a failure. `toolkit` and `perf` share the
    group class that turns it into exit 130, as `toolkit serve` exits."""
    import click

    from toolkit.cli_base import ToolkitGroup

    @click.group(cls=ToolkitGroup)
    def group():
        pass

    @group.command()
    def work():
        raise KeyboardInterrupt

    result = CliRunner().invoke(group, ["work"])
    assert result.exit_code == 130 and result.output == "\ninterrupted: exit 130\n", result.output


def test_seq_auto_reads_plain_texts_and_says_which_rows_it_reads(checkpoints, tokenizers, tmp_path):
    """`--lengths texts.jsonl` of `{"text": ...}` rows failed with `field 'score' is missing`: only token lengths are
    needed. The reranker's plain rows are (query, document) pairs, as --calibration files hold them."""
    from toolkit.buckets import suggest_for_dataset, suggest_seq_lens, token_lengths
    from toolkit.tasks import EMBEDDING, RERANKER

    texts = ["a short text", "a somewhat longer text than the first one " * 3, "mid length text here " * 2]
    data = tmp_path / "texts.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    lengths = token_lengths(EMBEDDING, tokenizers["embedding"], texts)
    shortest = EMBEDDING.min_seq_len(tokenizers["embedding"], EMBEDDING.fixed_instruction(None))
    assert suggest_for_dataset("embedding", str(checkpoints["embedding"]), str(data), count=2, multiple=4) == \
        suggest_seq_lens(lengths, 2, 4, minimum=shortest)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"query": "a query", "document": t}) + "\n" for t in texts))
    lengths = token_lengths(RERANKER, tokenizers["reranker"], [("a query", t) for t in texts])
    assert max(suggest_for_dataset("reranker", str(checkpoints["reranker"]), str(pairs), count=2)) >= lengths.max()
    with pytest.raises(ToolkitError, match=r"texts.jsonl:2: field 'text' must be a non-empty text, got the number 3"):
        data.write_text('{"text": "fine"}\n{"text": 3}\n')
        suggest_for_dataset("embedding", str(checkpoints["embedding"]), str(data))
    data.write_text('{"sentence": "not a known row"}\n')
    with pytest.raises(ToolkitError, match=r"--lengths reads JSONL rows of \{\"text\"\}"):
        suggest_for_dataset("embedding", str(checkpoints["embedding"]), str(data))


def test_quantization_settings_the_build_does_not_use_are_warned_about(checkpoints, tmp_path):
    """A config's `quantization:` block was silently ignored by an fp16 build (`--calibration` is refused there): it
    is warned about, not refused, as the same config builds int8 with `--dtype int8`."""
    from toolkit.compile import compile_config

    class Started(Exception):
        """The build reached its model work: every check and warning came before."""

    logged = []

    def log(line):
        logged.append(line)
        if line.startswith("checkpoint "):
            raise Started

    cfg = BuildConfig(name="x", task="embedding", checkpoint=str(checkpoints["embedding"]), seq_lens=(32,),
                      workspace=tmp_path, smooth_alpha=0.8, preflight=False, source=tmp_path / "c.yaml")
    with pytest.raises(Started):
        compile_config(cfg, log)
    assert logged[:-1] == [f"warning: quantization.smooth_alpha, quantization.preflight in {tmp_path / 'c.yaml'}: "
                           "unused by a fp16 build (the quantization block applies to --dtype int8 builds, its "
                           "calibration also to bf16)"]
    for quiet in (replace(cfg, smooth_alpha=0.5, preflight=True), replace(cfg, dtype="int8")):
        logged.clear()
        with pytest.raises(Started):
            compile_config(quiet, log)
        assert not [line for line in logged if line.startswith("warning:")], logged
