"""Everything that differs between the two tasks, in one place.

A `Task` knows, for Qwen3-Embedding or Qwen3-Reranker: the Hugging Face class of the reference model and how to read
its output, how Qwen saves its checkpoint, what the compiled graph outputs, the output head (MRL cut + L2
normalisation, or P(yes) from the answer tokens' logits), the prompt layout and default instructions, the one agreement
measure between a reference and a candidate (with its tolerances per dtype), how the task ranks passages for a query
(and scores sentence pairs), and what `toolkit demo` shows of it. Callers ask `TASKS[name]` (or use `EMBEDDING`,
`RERANKER`); nothing else branches on the task.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from typing_extensions import override

from toolkit.errors import ToolkitError, clipped, is_integer
from toolkit.report import format_columns, format_table
from toolkit.tokenizer import ENDOFTEXT_ID, check_unicode

WEB_SEARCH_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
# Qwen's own harness (Qwen3-Embedding evaluation/task_prompts.json) for STS and pair tasks: no trailing period.
SIMILARITY_INSTRUCTION = "Retrieve semantically similar text"
# A query up to its text: a token ends there whatever the text is (the colon may join the text's first word, so it is
# left out), so with a fixed instruction its tokens start every query
QUERY_INSTRUCTION_HEAD = "Instruct: {instruction}\nQuery"
QUERY_TEMPLATE = QUERY_INSTRUCTION_HEAD + ":{query}"
RERANK_PREFIX = ("<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
                 "Instruct provided. Note that the answer can only be \"yes\" or \"no\".<|im_end|>\n<|im_start|>user\n")
# The body up to its query: a token ends there whatever the query is (the query follows a space, and the tokenizer's
# pre-split never joins ">:" to what follows it), so with a fixed instruction its tokens start every input
RERANK_INSTRUCTION_HEAD = "<Instruct>: {instruction}\n<Query>:"
RERANK_BODY = RERANK_INSTRUCTION_HEAD + " {query}\n<Document>: {document}"
RERANK_SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


RANK_MIN_ITEMS = 20  # below it Kendall tau is too coarse to gate (`Task.rank_floor`)


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def yes_log_odds(logits: np.ndarray) -> np.ndarray:
    """log(P(yes) / P(no)) from ("no", "yes") logits, one per row (float64): the score before the softmax squashes it
    (TEI's `raw_scores`), exact where P(yes) rounds to 0 or 1."""
    logits = np.asarray(logits, dtype=np.float64).reshape(-1, 2)
    return logits[:, 1] - logits[:, 0]


def yes_probability(logits: np.ndarray) -> np.ndarray:
    """softmax over ("no", "yes") logits → P(yes), one per row."""
    return (1.0 / (1.0 + np.exp(-yes_log_odds(logits)))).astype(np.float32)


def split_groups(flat: np.ndarray, groups: list[list]) -> list[np.ndarray]:
    """Cut a flat array of per-item results back into the groups (e.g. each query's passages) it came from."""
    bounds = np.cumsum([len(g) for g in groups])[:-1]
    return np.split(flat, bounds)


def check_instruction_text(instruction) -> None:
    """Refuse an instruction that is not a text (None: the default), is only whitespace (an instruction line with no
    instruction in it), or not valid Unicode."""
    if instruction is None:
        return
    if not isinstance(instruction, str):
        raise ToolkitError(f"instruction must be a text (or None for the default), got "
                           f"{type(instruction).__name__}")
    if instruction and not instruction.strip():
        raise ToolkitError(f"the instruction {clipped(repr(instruction))} is only whitespace: give one with words, "
                           '"" for none, or leave it out for the default')
    check_unicode([instruction], ["the instruction"])


@dataclass(frozen=True)
class PromptLayout:
    """Token ids around a truncatable body: `prefix + body + suffix`; only the body is ever cut."""

    prefix: list[int]
    suffix: list[int]

    @property
    def fixed(self) -> int:
        """Tokens that are always there, whatever the body."""
        return len(self.prefix) + len(self.suffix)


class Task:
    """One task's knowledge. Instances: `EMBEDDING`, `RERANKER` (look them up with `TASKS[name]`)."""

    name: str
    family: str  # the model family Qwen releases for it
    # whether Qwen saves its checkpoints as a causal LM's (`model.`-prefixed, an lm_head where untied) rather than a
    # bare Qwen3Model's: config.json's `architectures` cannot tell (both name Qwen3ForCausalLM), the weights can
    saved_as_causal_lm: bool
    # whether a checkpoint saved the other way is refused (else only warned about): see `checkpoint.check_task`
    refuses_other_layout: bool
    output_name: str  # the compiled graph's output, also the patched model's head
    dataset_kinds: tuple[str, ...]  # evaluation data it can be scored on
    eos_token: str  # the checkpoint tokenizer's eos (what Qwen ships for this model)
    tokenizer_appends_eos: bool  # whether that tokenizer's post-processor appends <|endoftext|>
    gate_key: str  # the agreement key the tolerance applies to
    # its column's format spec in tables, as `format_agreement` writes it: cosines near 1 to the digit that matters,
    # |ΔP| near 0 in scientific notation
    agreement_format: str
    tolerances: dict[str, float]  # per weight dtype, against the fp32 Hugging Face model
    # per weight dtype, the lowest Kendall tau between the reference's and the candidate's outputs (empty: not gated):
    # a model can stay within its error tolerance and still reorder what it ranks
    rank_floors: dict[str, float] = {}

    @property
    def a_name(self) -> str:
        """The name with its article, for messages: "an embedding", "a reranker"."""
        return f"{'an' if self.name[0] in 'aeiou' else 'a'} {self.name}"

    def output_spec(self, batch: int, hidden_size: int) -> dict:
        """The compiled graph's output tensor (name, shape, dtype)."""
        raise NotImplementedError

    def hf_model_class(self):
        """The Hugging Face auto class users load this model with."""
        raise NotImplementedError

    def reference_forward(self, model, input_ids, attention_mask) -> np.ndarray:
        """Run the unpatched Hugging Face model; returns what the compiled graph returns (raw, before the head).
        Without a KV cache (`use_cache=False`, same outputs): one forward needs none, and Transformers' default keeps
        every layer's keys and values (0.6B, a 2,048-token validation pass: 16 MB per layer, 450 MB in all)."""
        raise NotImplementedError

    def finish(self, raw: np.ndarray, **options) -> np.ndarray:
        """The output head applied to raw graph outputs: what users receive."""
        raise NotImplementedError

    def prompt(self, tokenizer) -> PromptLayout:
        """The fixed tokens around every body."""
        raise NotImplementedError

    def min_seq_len(self, tokenizer, instruction: str | None = None) -> int:
        """The shortest SEQ an artifact of this task can be useful at (for inputs carrying `instruction`)."""
        return self.prompt(tokenizer).fixed + 1

    def fixed_instruction(self, instruction: str | None) -> str | None:
        """The instruction every input of a build carries, given the build's (`None`: none named), whose tokens an
        artifact can cache after the prompt prefix: the reranker's (web search unless named); the embedding's only when
        named (its sets embed documents bare, and queries with any instruction, unless built for one)."""
        raise NotImplementedError

    def query_instruction(self, fixed: str | None) -> str:
        """The instruction a query (an embedding query, a reranker pair) gets unless a call names one: `fixed`, the one
        a set or build fixes (`fixed_instruction`), else (None) web search."""
        return WEB_SEARCH_INSTRUCTION if fixed is None else fixed

    def prompt_start(self, tokenizer, instruction: str | None = None) -> list[int]:
        """The tokens every input starts with, which an artifact can cache: the prompt prefix, then with a fixed
        `instruction` the input's text up to the query (`RERANK_INSTRUCTION_HEAD`, `QUERY_INSTRUCTION_HEAD`)."""
        raise NotImplementedError

    # ---- agreement: one measure, one set of keys -------------------------------------------------------------------
    def agreement(self, reference: np.ndarray, candidate: np.ndarray) -> dict:
        """Item-by-item agreement of two engines' finished outputs (normalised embeddings or P(yes))."""
        raise NotImplementedError

    def bound(self, dtype: str, budget: float = 1.0) -> float:
        """The gate key's limit for `dtype` when only the share `budget` of its error budget may be used."""
        bound = self.tolerances[dtype]
        return bound if budget == 1 else (1 - budget * (1 - bound) if self.gate_key == "min_cosine" else budget * bound)

    def within_tolerance(self, stats: dict, dtype: str, budget: float = 1.0) -> bool:
        """Whether an agreement measured against the fp32 reference meets the dtype's tolerance (NaN never does),
        using at most the share `budget` of its error budget, and its rank floor (`rank_floor`)."""
        value, bound = stats[self.gate_key], self.bound(dtype, budget)
        if stats["nonfinite"] or not np.isfinite(value):
            return False
        if (floor := self.rank_floor(stats, dtype)) is not None and stats["kendall_tau"] < floor:
            return False
        return value >= bound if self.gate_key == "min_cosine" else value <= bound

    def rank_floor(self, stats: dict, dtype: str) -> float | None:
        """The Kendall tau `stats` must reach, or None where not gated: no floor for the task, tau undefined, or
        fewer than RANK_MIN_ITEMS items (one swap among 3 edge cases moves tau by 0.67)."""
        floor = self.rank_floors.get(dtype)
        if floor is None or stats.get("kendall_tau") is None or stats["items"] < RANK_MIN_ITEMS:
            return None
        return floor

    def shortfall(self, value: float) -> float:
        """How far a value of the gate key is from exact agreement (1 - cosine, or |Δ P(yes)| itself): larger is
        worse."""
        return 1 - value if self.gate_key == "min_cosine" else value

    def tolerance_used(self, stats: dict, dtype: str) -> float:
        """The share of the dtype's error budget an agreement uses: 1.0 at the tolerance (for cosine, 1 - min cosine
        against 1 - the bound)."""
        return self.shortfall(stats[self.gate_key]) / self.shortfall(self.tolerances[dtype])

    def tolerance_text(self, dtype: str, budget: float = 1.0, stats: dict | None = None) -> str:
        """The tolerance as a readable bound, e.g. `min_cosine >= 0.999`; with a `budget` below 1, the share of it
        used; with `stats` whose tau is gated, the rank floor too."""
        op = ">=" if self.gate_key == "min_cosine" else "<="
        if budget == 1:
            text = f"{self.gate_key} {op} {self.tolerances[dtype]}"
        else:
            text = (f"{self.gate_key} {op} {self.bound(dtype, budget):.4g}: the {dtype} tolerance "
                    f"{self.tolerances[dtype]} less {1 - budget:.0%} of its error budget, a margin for a sample of "
                    f"{stats['items']} items")
        if stats is not None and (floor := self.rank_floor(stats, dtype)) is not None:
            text += f", kendall_tau >= {floor}"
        return text

    def judge(self, stats: dict, dtype: str, budget: float = 1.0) -> dict:
        """`stats` (an agreement against the fp32 reference) with the dtype's tolerance text and whether it meets it
        added (`tolerance`, `passed`), within the share `budget` of the error budget."""
        stats["tolerance"] = self.tolerance_text(dtype, budget, stats)
        stats["passed"] = self.within_tolerance(stats, dtype, budget)
        return stats

    def format_agreement(self, stats: dict) -> str:
        """One line for logs and reports."""
        raise NotImplementedError

    def rank_passages(self, model, queries: list[str], passages: list[list[str]], instruction: str):
        """Score each query's passages with this task's model: `(items, per-query score arrays)`; `items` are the
        finished outputs compared between engines."""
        raise NotImplementedError

    def score_pairs(self, model, examples: list, instruction: str) -> tuple[np.ndarray, np.ndarray]:
        """Score sentence pairs (examples with `sentence1`, `sentence2`; data of kind "pairs") with this task's model:
        `(items, one similarity per pair)`; `items` are the finished outputs compared between engines."""
        raise NotImplementedError

    def demo_tables(self, compiled, torch_ref, queries: list[str], documents: list[str],
                    echo) -> tuple[np.ndarray, np.ndarray]:
        """`toolkit demo`'s display: `queries` and `documents` through the torch reference and the compiled model,
        printed as tables with `echo`; returns the finished outputs (torch's, the artifact's) for `agreement`."""
        raise NotImplementedError

    def bare_inputs(self, kind: str) -> bool:
        """Whether evaluating on data of `kind` feeds the model texts without the instruction (which a set compiled
        for one instruction refuses)."""
        return False

    # ---- traffic: what a service of this task receives, replayed from evaluation data ------------------------------
    def traffic(self, examples: list) -> list:
        """The requests an evaluation set holds for this task: texts to embed, or (query, passage) pairs to score."""
        raise NotImplementedError

    def body(self, request, instruction: str | None = None) -> str:
        """The truncatable text of one request (what goes between the prompt's prefix and suffix), with `instruction`
        (None: the reranker's web-search one; the embedding's text bare)."""
        raise NotImplementedError

    def calibration_bodies(self, records: list[tuple[str, str]], instruction: str | None = None) -> list[str]:
        """The bodies this task's model sees for (query, document) records of real text, in the API's formats; with a
        build's fixed `instruction` (`fixed_instruction`), every body carries it."""
        raise NotImplementedError

    def run_requests(self, model, requests: list, instruction: str | None = None, progress: bool = False) -> np.ndarray:
        """Run requests through this task's high-level model (Embedder / Reranker), with `instruction` as `body` reads
        it: the finished outputs."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"Task({self.name})"


class EmbeddingTask(Task):
    """Qwen3-Embedding: last token's final hidden state, L2-normalised (after an optional MRL cut)."""

    name, family, output_name = "embedding", "Qwen3-Embedding", "last_hidden"
    # an embedding model fine-tuned and saved as a causal LM is taken as it is: its LM head is never read
    saved_as_causal_lm, refuses_other_layout = False, False
    dataset_kinds = ("pairs", "reranking")
    eos_token, tokenizer_appends_eos = "<|endoftext|>", True
    gate_key = "min_cosine"
    agreement_format = ".6f"
    tolerances = {"fp16": 0.999, "fp32": 0.99999, "bf16": 0.999, "int8": 0.99}

    @override
    def output_spec(self, batch, hidden_size):
        return {"name": self.output_name, "shape": [batch, hidden_size], "dtype": "float32"}

    @override
    def hf_model_class(self):
        from transformers import AutoModel

        return AutoModel

    @override
    def reference_forward(self, model, input_ids, attention_mask):
        out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)  # see Task.reference_forward
        return out.last_hidden_state[:, -1].float().numpy()

    @override
    def finish(self, raw, dim: int | None = None, normalize: bool = True):
        raw = np.asarray(raw, dtype=np.float32)
        if dim is not None:
            if not is_integer(dim) or not 0 < dim <= raw.shape[-1]:
                raise ToolkitError(f"dim must be an integer in 1..{raw.shape[-1]}, got {dim!r}")
            raw = raw[:, :dim]  # Matryoshka (MRL): cut first, then normalise
        return l2_normalize(raw) if normalize else raw

    @override
    def prompt(self, tokenizer):
        return PromptLayout(prefix=[], suffix=[ENDOFTEXT_ID])

    @override
    def min_seq_len(self, tokenizer, instruction=None):
        # a query's instruction head, its colon and a token of text, <|endoftext|>
        return self.prompt(tokenizer).fixed + (len(self.prompt_start(tokenizer, instruction)) + 2 if instruction else 1)

    @override
    def fixed_instruction(self, instruction):
        return instruction or None  # none named (or ""): documents bare, queries with any

    @override
    def prompt_start(self, tokenizer, instruction=None):
        return tokenizer.encode_one(QUERY_INSTRUCTION_HEAD.format(instruction=instruction)) if instruction else []

    def format_query(self, text: str, instruction: str | None) -> str:
        """Qwen3-Embedding's query format; an empty or missing instruction means no prefix at all (as in Qwen's
        harness and MTEB)."""
        return QUERY_TEMPLATE.format(instruction=instruction, query=text) if instruction else text

    @override
    def agreement(self, reference, candidate):
        cos = np.sum(np.asarray(reference, np.float64) * np.asarray(candidate, np.float64), axis=-1)
        return {"items": int(len(cos)), "nonfinite": int((~np.isfinite(candidate)).sum()),
                "min_cosine": float(np.min(cos)), "p1_cosine": float(np.percentile(cos, 1)),
                "mean_cosine": float(np.mean(cos)),
                "max_abs_diff": float(np.max(np.abs(np.asarray(reference) - np.asarray(candidate))))}

    @override
    def format_agreement(self, stats):
        return (f"min cosine {stats['min_cosine']:.6f}, max |Δ| normalised {stats['max_abs_diff']:.2e}, "
                f"non-finite {stats['nonfinite']} ({stats['items']} items)")

    @override
    def rank_passages(self, model, queries, passages, instruction):
        q = model.encode_queries(queries, instruction=instruction, progress=True)
        flat = model.encode_documents([p for ps in passages for p in ps], progress=True)
        return np.concatenate([q, flat]), [group @ vector for vector, group in zip(q, split_groups(flat, passages))]

    @override
    def score_pairs(self, model, examples, instruction):
        # every distinct sentence embedded once, with the instruction on both sides (a symmetric task)
        texts = sorted({t for e in examples for t in (e.sentence1, e.sentence2)})
        index = {t: i for i, t in enumerate(texts)}
        vectors = model.encode(texts, instruction=instruction, progress=True)
        a = vectors[[index[e.sentence1] for e in examples]]
        b = vectors[[index[e.sentence2] for e in examples]]
        return vectors, np.sum(a * b, axis=-1)

    @override
    def demo_tables(self, compiled, torch_ref, queries, documents, echo):
        texts = [("query", q) for q in queries] + [("document", d) for d in documents]
        outs = {name: (model.encode_queries(queries), model.encode_documents(documents))
                for name, model in (("torch", torch_ref), ("artifact", compiled))}
        ref, art = (np.concatenate(outs[name]) for name in ("torch", "artifact"))
        # one format down the column (per cell, 1.0 read `1.000` and 0.99996 `1.0000`), as the agreement line's
        echo(format_columns(["kind", "text", "cos(torch, artifact)"], [None, None, self.agreement_format],
                            [[kind, text[:48], float(c)] for (kind, text), c in zip(texts, np.sum(ref * art, axis=-1))],
                            title="per-item cosine similarity"))
        sims = {name: q @ d.T for name, (q, d) in outs.items()}
        rows = [[queries[i][:30]] + [f"{sims['torch'][i, j]:.4f} / {sims['artifact'][i, j]:.4f}"
                                     for j in range(len(documents))] for i in range(len(queries))]
        echo("\n" + format_table(["query \\ document"] + [f"doc{j}" for j in range(len(documents))], rows,
                                 title="query-document similarity, torch / artifact"))
        return ref, art

    @override
    def bare_inputs(self, kind):
        return kind == "reranking"  # `rank_passages` embeds the passages as documents

    @override
    def traffic(self, examples):
        texts = []
        for e in examples:  # sentence pairs, or a query and its candidate passages
            texts += [e.sentence1, e.sentence2] if hasattr(e, "sentence1") else [e.query, *e.passages]
        return texts

    @override
    def body(self, request, instruction=None):
        return self.format_query(request, instruction)

    @override
    def calibration_bodies(self, records, instruction=None):
        if instruction:  # a set built for one instruction embeds every text as a query with it
            return [self.format_query(text, instruction) for record in records for text in record]
        return [text for q, d in records for text in (self.format_query(q, WEB_SEARCH_INSTRUCTION), d)]

    @override
    def run_requests(self, model, requests, instruction=None, progress=False):
        return model.encode(requests, instruction=instruction, progress=progress)


class RerankerTask(Task):
    """Qwen3-Reranker: P(yes) from the "no"/"yes" logits at the last position of the chat prompt."""

    name, family, output_name = "reranker", "Qwen3-Reranker", "yes_no_logits"
    # a bare model is laid out as Qwen3-Embedding is: no LM head trained to answer yes or no
    saved_as_causal_lm, refuses_other_layout = True, True
    answer_token_ids = (2152, 9693)  # "no" and "yes" in Qwen3's vocabulary: the logits the head keeps, in that order
    dataset_kinds = ("reranking",)
    eos_token, tokenizer_appends_eos = "<|im_end|>", False
    gate_key = "max_abs_diff"
    agreement_format = ".2e"
    tolerances = {"fp16": 1e-2, "fp32": 1e-4, "bf16": 5e-3, "int8": 2e-2}
    # Measured on the tiny outlier reranker's gate (edge cases and the bundled held-out texts, 75 items) and on 200 MS
    # MARCO pairs: good int8 builds (onnx, tvm; smoothing with GPTQ, or kept layers) tau 0.87-1.0, bf16 0.995-1.0;
    # int8 without smoothing and rounded to nearest 0.68 (gate) / 0.72 (MS MARCO), inside its |dP| tolerance; its
    # junk-calibrated twin -0.26. The 0.6B outlier reranker's int8 gates: 0.915-0.960, bf16 0.989-0.994
    rank_floors = {"fp16": 0.9, "fp32": 0.9, "bf16": 0.9, "int8": 0.8}

    @override
    def output_spec(self, batch, hidden_size):
        return {"name": self.output_name, "shape": [batch, 2], "dtype": "float32"}

    @override
    def hf_model_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    @override
    def reference_forward(self, model, input_ids, attention_mask):
        # logits_to_keep=1: only the last position's [vocab] logits, not [batch, seq, 151669]
        out = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=1, use_cache=False)
        return out.logits[:, -1, list(self.answer_token_ids)].float().numpy()

    @override
    def finish(self, raw, **options):
        return yes_probability(raw)

    @override
    def prompt(self, tokenizer):
        return PromptLayout(prefix=tokenizer.encode_one(RERANK_PREFIX), suffix=tokenizer.encode_one(RERANK_SUFFIX))

    @override
    def min_seq_len(self, tokenizer, instruction=None):
        # the prompt, the body's own template (with the instruction, or one token of it), a token of query and document
        empty_body = RERANK_BODY.format(instruction=instruction or "", query="", document="")
        return self.prompt(tokenizer).fixed + len(tokenizer.encode_one(empty_body)) + (2 if instruction else 3)

    @override
    def fixed_instruction(self, instruction):
        return self.query_instruction(instruction)

    @override
    def prompt_start(self, tokenizer, instruction=None):
        prefix = self.prompt(tokenizer).prefix
        if instruction is None:
            return prefix
        return prefix + tokenizer.encode_one(RERANK_INSTRUCTION_HEAD.format(instruction=instruction))

    def format_body(self, query: str, document: str, instruction: str | None) -> str:
        """The user turn of Qwen3-Reranker's prompt (the web-search instruction when none is given)."""
        return RERANK_BODY.format(instruction=self.query_instruction(instruction), query=query, document=document)

    @override
    def agreement(self, reference, candidate):
        from scipy.stats import kendalltau

        diff = np.abs(np.asarray(reference, np.float64) - np.asarray(candidate, np.float64))
        tau = kendalltau(reference, candidate).statistic if len(diff) > 1 and np.isfinite(candidate).all() else None
        return {"items": int(len(diff)), "nonfinite": int((~np.isfinite(candidate)).sum()),
                "max_abs_diff": float(np.max(diff)), "mean_abs_diff": float(np.mean(diff)),
                "kendall_tau": None if tau is None or not np.isfinite(tau) else float(tau)}

    @override
    def format_agreement(self, stats):
        tau = stats.get("kendall_tau")
        return (f"max |Δ P(yes)| {stats['max_abs_diff']:.2e}, mean {stats['mean_abs_diff']:.2e}, "
                f"Kendall τ {'n/a' if tau is None else f'{tau:.4f}'}, non-finite {stats['nonfinite']} "
                f"({stats['items']} items)")

    @override
    def rank_passages(self, model, queries, passages, instruction):
        flat = model.score([(q, p) for q, ps in zip(queries, passages) for p in ps], instruction, progress=True)
        return flat, split_groups(flat, passages)

    @override
    def demo_tables(self, compiled, torch_ref, queries, documents, echo):
        pairs = [(q, d) for q in queries for d in documents]
        instruction = self.query_instruction(compiled.fixed_instruction)  # the one it was compiled for, if any
        ref, art = torch_ref.score(pairs, instruction), compiled.score(pairs, instruction)
        echo(format_columns(["query", "document", "torch P(yes)", "artifact P(yes)", "|diff|"],
                            [None, None, ".4f", ".4f", self.agreement_format],
                            [[q[:30], d[:36], float(x), float(y), float(abs(x - y))]
                             for (q, d), x, y in zip(pairs, ref, art)], title="reranker scores"))
        return ref, art

    @override
    def traffic(self, examples):
        return [(e.query, p) for e in examples for p in e.passages]

    @override
    def body(self, request, instruction=None):
        return self.format_body(*request, instruction)

    @override
    def calibration_bodies(self, records, instruction=None):
        return [self.format_body(q, d, instruction) for q, d in records]

    @override
    def run_requests(self, model, requests, instruction=None, progress=False):
        return model.score(requests, instruction, progress=progress)


EMBEDDING, RERANKER = EmbeddingTask(), RerankerTask()
TASKS: dict[str, Task] = {t.name: t for t in (EMBEDDING, RERANKER)}


def get_task(name: str) -> Task:
    """The task called `name`, or an error listing the known ones."""
    try:
        return TASKS[name]
    except (KeyError, TypeError):
        raise ToolkitError(f"task must be one of {sorted(TASKS)}, got {name!r}") from None
