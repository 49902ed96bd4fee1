"""`toolkit demo`: the reference demo's sentences through the torch reference and an artifact, side by side."""
from __future__ import annotations

from pathlib import Path

from toolkit.api import check_set, model_class
from toolkit.artifact import BACKENDS
from toolkit.errors import ToolkitError
from toolkit.eval.run import refuse_bare_inputs
from toolkit.tasks import Task

QUERIES = ["What is the capital of China?", "Explain gravity", "中国的首都是哪里？", "什么是万有引力？"]
DOCUMENTS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other. It gives weight to physical objects and is "
    "responsible for the movement of planets around the sun.",
    "北京是中华人民共和国的首都，也是全国的政治和文化中心。",
    "万有引力是物体之间相互吸引的力，它使行星围绕太阳运动。",
]
QUICKSTART_ARTIFACTS = Path("quickstart/artifacts")  # where `make quickstart` puts them (see the Makefile)


def default_artifact(task: Task) -> Path:
    """The quickstart's bucket set for `task`, of whichever backend `make quickstart BACKEND=...` built (onnx first)."""
    task_dir = QUICKSTART_ARTIFACTS / f"quickstart-{task.name}"
    for backend in BACKENDS:
        if (task_dir / backend).is_dir():
            return task_dir / backend
    raise ToolkitError(f"no quickstart artifact in {task_dir}/{{{','.join(BACKENDS)}}}: run `make quickstart` or "
                       f"pass --artifact DIR")


def run_demo(task: Task, artifact: str | Path | None, checkpoint: str | None, echo=print) -> bool:
    """Print the side-by-side tables; return True when the artifact is within tolerance of torch. Off tolerance, the
    last line names the likely cause as `toolkit eval` does (another checkpoint than the set's build)."""
    source = artifact or default_artifact(task)
    manifests = check_set(source, task, lambda found: f"pass --task {found}, or a set of {task.name} artifacts")
    # queries and their documents, as a ranking dataset has them: refused where `toolkit eval` refuses such data
    refuse_bare_inputs(task, source, manifests, "reranking", "the demo")
    reference = checkpoint or manifests[0].reference_checkpoint()
    cls = model_class(task)
    with cls.from_artifacts(source, truncation="truncate") as compiled, \
            cls.from_checkpoint(reference, max_length=compiled.max_length, truncation="truncate") as torch_ref:
        echo(f"{task.name} demo: torch (unpatched Hugging Face, fp32) vs {manifests[0].backend} artifact "
             f"({manifests[0].dtype}, SEQ {[m.seq_len for m in manifests]})\n")
        ref_out, art_out = task.demo_tables(compiled, torch_ref, QUERIES, DOCUMENTS, echo)
    stats = task.judge(task.agreement(ref_out, art_out), manifests[0].dtype)
    echo(f"\n{task.format_agreement(stats)} (tolerance {stats['tolerance']}): {'OK' if stats['passed'] else 'FAIL'}")
    if not stats["passed"]:
        echo(manifests[0].parity_failure_hint(reference, checkpoint is not None))
    return stats["passed"]

