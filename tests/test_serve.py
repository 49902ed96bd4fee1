"""`toolkit serve` with real clients on loopback: the official OpenAI client and Hugging Face's InferenceClient get
what the offline API computes; TEI's and Cohere's routes, tokenisation, health, info and metrics over httpx; every
bad request answered with its status and a message (never a 500), and never failing another client's request; a
backend failure is a 503 for the request it hit while the server goes on, a dead scheduler a 503 at once; a client
that leaves costs no compute for its rows still waiting for a batch; SIGTERM finishes the requests in flight and exits
0; bad flags are one-line errors, the port is bound before models load."""
import asyncio
import base64
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from contextlib import contextmanager
from http.client import HTTPConnection

import httpx
import numpy as np
import openai
import pytest
import uvicorn
from click.testing import CliRunner
from huggingface_hub import InferenceClient
from serving import TIMEOUT, bucket_sets, serve_process, served, wait_for

from toolkit.api import Embedder, Reranker
from toolkit.artifact import find_artifacts
from toolkit.backends import Backend, open_backend
from toolkit.checkpoint import load_tokenizer
from toolkit.cli import main
from toolkit.errors import ToolkitError
from toolkit.runner import BucketedRunner
from toolkit.runtime import Engine
from toolkit.scheduler import MAX_WAIT_MS, SchedulerObserver
from toolkit.serve.app import ERROR_TYPES, StopWhenClientLeaves, VectorsResponse, create_app
from toolkit.serve.server import DrainingServer, engines_line
from toolkit.serve.service import Limits, model_sets
from toolkit.tasks import SIMILARITY_INSTRUCTION, WEB_SEARCH_INSTRUCTION
from toolkit.tokenizer import ENDOFTEXT_ID

from conftest import build

TEXTS = ["What is the capital of China?", "The capital of China is Beijing.", "北京是中国的首都。", "short",
         "a somewhat longer sentence " * 4]
DOCS = ["Beijing is the capital of China.", "Gravity pulls things down.", "Paris is in France."]
QUERY = "What is the capital of China?"


@pytest.fixture(scope="module")
def sets(onnx_artifacts):
    return bucket_sets(onnx_artifacts)


@pytest.fixture(scope="module")
def offline(sets):
    with Embedder.from_artifacts(sets["embedding"]) as emb, Reranker.from_artifacts(sets["reranker"]) as rr:
        yield {"embedding": emb, "reranker": rr}


@pytest.fixture(scope="module")
def url(sets):
    app = create_app(Embedder.from_artifacts(sets["embedding"]), Reranker.from_artifacts(sets["reranker"]))
    with served(app) as base:
        yield base


LIMITS = Limits(max_client_batch_size=2, payload_limit=2000, max_input_length=40)


@pytest.fixture(scope="module")
def limited_url(sets):
    """Embedding only, with small limits."""
    app = create_app(Embedder.from_artifacts(sets["embedding"], max_length=LIMITS.max_input_length), limits=LIMITS)
    with served(app) as base:
        yield base


def max_abs_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def test_vectors_are_written_as_float32_text_whatever_their_memory_layout():
    """Shortest float32 text, read back bit for bit; a view cut to fewer dimensions is written like a copy."""
    vectors = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    for content in (vectors, vectors[:, :5], [vectors[0, ::2]]):
        written = json.loads(VectorsResponse(content).body)
        assert np.array_equal(np.asarray(written, np.float32), np.asarray(content, np.float32))


def test_openai_client_gets_the_embedder_vectors(url, offline):
    emb = offline["embedding"]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    want = emb.encode_documents(TEXTS)
    for encoding in ({}, {"encoding_format": "float"}):  # the client asks for base64 and decodes it by default
        got = client.embeddings.create(model="qwen3-embedding", input=TEXTS, **encoding)
        # the served set's name, whatever the client called it (as TEI answers)
        assert [d.index for d in got.data] == list(range(len(TEXTS))) and got.model == emb.manifests[0].name
        assert max_abs_diff([d.embedding for d in got.data], want) <= 1e-6
    encoded = client.embeddings.create(model="m", input=TEXTS, encoding_format="base64")  # left to the caller
    assert max_abs_diff([np.frombuffer(base64.b64decode(d.embedding), "<f4") for d in encoded.data], want) <= 1e-6
    assert got.usage.prompt_tokens == sum(map(len, emb.tokenize(TEXTS)))
    cut = client.embeddings.create(model="m", input=TEXTS[0], dimensions=16)
    assert max_abs_diff([cut.data[0].embedding], emb.encode_documents(TEXTS[:1], dim=16)) <= 1e-6
    body = emb.tokenize(TEXTS[:1])[0][:-1]  # the text's tokens, without the closing <|endoftext|>
    by_ids = client.embeddings.create(model="m", input=[body, body[:3]])
    assert max_abs_diff([by_ids.data[0].embedding], want[:1]) <= 1e-6
    short = emb.task.finish(emb.runner.run(emb.tokenize_ids([body[:3]])))
    assert max_abs_diff([by_ids.data[1].embedding], short) <= 1e-6
    single = client.embeddings.create(model="m", input=body)  # one input as a flat list of ids
    assert max_abs_diff([single.data[0].embedding], want[:1]) <= 1e-6
    with pytest.raises(openai.UnprocessableEntityError, match="at least 1 item"):
        client.embeddings.create(model="m", input=[])


def test_hugging_face_inference_client_feature_extraction(url, offline, monkeypatch):
    import huggingface_hub.constants

    # the tests' offline switch blocks every URL, loopback included; this one is a local server
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    emb = offline["embedding"]
    client = InferenceClient(base_url=url, timeout=TIMEOUT)
    assert max_abs_diff(client.feature_extraction(TEXTS[0]), emb.encode_documents(TEXTS[:1])) <= 1e-6
    queries = client.feature_extraction(TEXTS[:2], prompt_name="query")
    assert max_abs_diff(queries, emb.encode_queries(TEXTS[:2])) <= 1e-6
    raw = client.feature_extraction(TEXTS[:2], normalize=False, truncate=True, dimensions=8)
    assert max_abs_diff(raw, emb.encode_documents(TEXTS[:2], dim=8, normalize=False)) <= 1e-6


def test_tei_and_cohere_routes_tokenize_health_info_metrics(url, offline):
    emb, rr = offline["embedding"], offline["reranker"]
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        vectors = http.post("/embed", json={"inputs": TEXTS, "instruction": "Find the city"}).json()
        assert max_abs_diff(vectors, emb.encode(TEXTS, instruction="Find the city")) <= 1e-6
        ranked = rr.rerank(QUERY, DOCS, return_documents=True)
        tei = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "return_text": True}).json()
        assert [t["index"] for t in tei] == [r["corpus_id"] for r in ranked]
        assert [t["text"] for t in tei] == [r["text"] for r in ranked]
        assert max_abs_diff([t["score"] for t in tei], [r["score"] for r in ranked]) <= 1e-6
        raw = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "raw_scores": True, "top_n": 2}).json()
        assert [t["index"] for t in raw] == [r["corpus_id"] for r in ranked[:2]] and "text" not in raw[0]
        assert max_abs_diff(1 / (1 + np.exp(-np.array([t["score"] for t in raw]))),
                            [r["score"] for r in ranked[:2]]) <= 1e-5  # log-odds: sigmoid gives P(yes) back
        cohere = http.post("/v1/rerank", json={"query": QUERY, "documents": DOCS, "top_n": 1,
                                               "return_documents": True}).json()
        [best] = cohere["results"]
        assert cohere["model"] == rr.manifests[0].name
        assert best["index"] == ranked[0]["corpus_id"] and best["document"] == {"text": ranked[0]["text"]}
        assert abs(best["relevance_score"] - ranked[0]["score"]) <= 1e-6
        assert cohere["usage"]["total_tokens"] == sum(map(len, rr.tokenize([(QUERY, d) for d in DOCS])))
        tokens = http.post("/tokenize", json={"inputs": "Hello world", "prompt_name": "query"}).json()
        assert [t["id"] for t in tokens[0]] == emb.tokenize(emb.format(["Hello world"], WEB_SEARCH_INSTRUCTION))[0]
        assert tokens[0][-1] == {"id": ENDOFTEXT_ID, "text": "<|endoftext|>", "special": True, "start": None,
                                 "stop": None}
        assert "".join(t["text"] for t in tokens[0][:-1]).endswith("Query:Hello world")
        assert http.get("/health").json() == {"status": "ok"} and http.head("/health").status_code == 200
        info = http.get("/info").json()
        assert info["models"]["embedding"]["buckets"] == [{"seq": 32, "batch": 2}, {"seq": 64, "batch": 2}]
        assert info["models"]["embedding"]["max_input_length"] == 64 and info["models"]["reranker"]["dtype"] == "fp16"
        # the API's default: one instance of the process's threads; `toolkit serve` prints this line per model
        assert engines_line(info["models"]["embedding"]) == (f"embedding: fp16 onnx, 2 bucket(s) (SEQ 32..64), 1 "
                                                             f"instance(s) x {info['compute_threads']} thread(s) per "
                                                             "bucket")
        assert info["limits"]["max_client_batch_size"] == Limits().max_client_batch_size
        metrics = http.get("/metrics").text
    for line in ('toolkit_http_requests_total{route="/embed",status="200"}',
                 'toolkit_http_requests_total{route="/v1/rerank",status="200"} 1.0',
                 'toolkit_stage_seconds_count{model="embedding",stage="tokenize"}',
                 'toolkit_stage_seconds_count{model="reranker",stage="queue"}',
                 'toolkit_stage_seconds_count{model="reranker",stage="inference"}',
                 'toolkit_batch_rows_count{model="embedding"}', 'toolkit_batch_tokens_sum{model="reranker"}',
                 'toolkit_padded_tokens_total{model="embedding"}', 'toolkit_queue_rows{model="embedding"} 0.0',
                 'toolkit_requests_in_flight{model="reranker"} 0.0'):
        assert line in metrics, line


def test_cohere_rerank_takes_documents_as_texts_or_objects(url, offline):
    """Cohere's and Jina's clients may send each document as {"text": ...} (other fields ignored); it is ranked as its
    text, and `return_documents` echoes it as Cohere does."""
    ranked = offline["reranker"].rerank(QUERY, DOCS, return_documents=True)
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        for documents in ([{"text": d} for d in DOCS], [DOCS[0], {"text": DOCS[1], "title": "ignored"}, DOCS[2]]):
            r = http.post("/v1/rerank", json={"query": QUERY, "documents": documents, "return_documents": True})
            assert r.status_code == 200, r.text
            results = r.json()["results"]
            assert [x["index"] for x in results] == [d["corpus_id"] for d in ranked]
            assert [x["document"] for x in results] == [{"text": d["text"]} for d in ranked]
            assert max_abs_diff([x["relevance_score"] for x in results], [d["score"] for d in ranked]) <= 1e-6


def test_tokenize_gives_each_token_its_characters_and_truncates_as_embed_does(limited_url, sets):
    """TEI's token fields: `start`/`stop` bound the characters of the input a token comes from (null for the prompt's
    tokens); `truncate` cuts as `/embed` does, and without `add_special_tokens` the ids are what `/v1/embeddings`
    takes for the same vector."""
    text = "北京是中国的首都。 e\u0301t\u00e9 <|endoftext|>, Hello world"  # a decomposed é; a special token in the text
    long_text = "word " * 60  # over the 40 tokens of limited_url
    with httpx.Client(base_url=limited_url, timeout=TIMEOUT) as http, \
            Embedder.from_artifacts(sets["embedding"], max_length=LIMITS.max_input_length) as capped:
        [tokens] = http.post("/tokenize", json={"inputs": text, "prompt_name": "query"}).json()
        assert [t["id"] for t in tokens] == capped.tokenize(capped.format([text], WEB_SEARCH_INSTRUCTION))[0]
        prompt = [t for t in tokens if t["start"] is None]
        assert "".join(t["text"] for t in prompt[:-1]).startswith("Instruct: ") and prompt[-1]["special"]
        spans = [(t["start"], t["stop"]) for t in tokens if t["start"] is not None]
        # in order and without overlap; the tokens of one character's bytes each cover that character
        assert all(a == b or a[1] <= b[0] for a, b in zip(spans, spans[1:]))
        assert "".join(text[start:stop] for (start, stop), previous in zip(spans, [None, *spans])
                       if (start, stop) != previous) == text
        special = next(t for t in tokens if t["id"] == ENDOFTEXT_ID and t["start"] is not None)
        assert special["special"] and text[special["start"]:special["stop"]] == "<|endoftext|>"
        # the tokenizers library maps the NFC-composed é of "ae\u0301" back to the e alone: no token covers the accent
        [tokens] = http.post("/tokenize", json={"inputs": "ae\u0301", "add_special_tokens": False}).json()
        assert [(t["start"], t["stop"]) for t in tokens] == [(0, 1), (1, 2)]

        r = http.post("/tokenize", json={"inputs": [long_text], "truncate": True})
        with pytest.warns(UserWarning, match="truncated to 40 tokens"):
            want = capped.tokenize([long_text], "truncate")
        assert r.status_code == 200 and [t["id"] for t in r.json()[0]] == want[0]
        assert r.json()[0][-2]["stop"] <= len(long_text)
        r = http.post("/tokenize", json={"inputs": long_text, "truncate": True, "add_special_tokens": False})
        ids = [t["id"] for t in r.json()[0]]
        assert ids == want[0][:-1]
        vectors = http.post("/v1/embeddings", json={"input": ids}).json()["data"]
        embedded = http.post("/embed", json={"inputs": long_text, "truncate": True}).json()
        assert max_abs_diff([vectors[0]["embedding"]], embedded) <= 1e-6


def error_message(response) -> str:
    error = response.json()["error"]
    return error["message"] if isinstance(error, dict) else error  # OpenAI's shape under /v1, TEI's elsewhere


def error_type(response) -> str:
    body = response.json()
    return body["error"]["type"] if isinstance(body["error"], dict) else body["error_type"]


LONE_SURROGATE = "\ud800"  # JSON's "\ud800": no valid UTF-8 text holds it


BAD_REQUESTS = [
    ("/embed", b'{"inputs": ', 422, "body: JSON decode error"),
    ("/embed", {}, 422, "inputs: Field required"),
    ("/embed", {"inputs": []}, 422, "inputs: List should have at least 1 item"),
    ("/embed", {"inputs": 5}, 422, "inputs: send a text or a list of texts"),
    ("/embed", {"inputs": ["a", 5]}, 422, "inputs.1: Input should be a valid string"),
    ("/embed", {"inputs": "a", "normalize": "maybe"}, 422, "normalize: Input should be a valid boolean"),
    # strict types: no coercion between JSON types
    ("/embed", {"inputs": "a", "normalize": "false"}, 422, "normalize: Input should be a valid boolean"),
    ("/embed", {"inputs": "a", "truncate": "true"}, 422, "truncate: Input should be a valid boolean"),
    ("/embed", {"inputs": "a", "dimensions": True}, 422, "dimensions: Input should be a valid integer"),
    ("/embed", {"inputs": "a", "dimensions": "8"}, 422, "dimensions: Input should be a valid integer"),
    ("/rerank", {"query": "q", "texts": ["d"], "top_n": True}, 422, "top_n: Input should be a valid integer"),
    ("/v1/rerank", {"query": "q", "documents": ["d"], "top_n": "2"}, 422, "top_n: Input should be a valid integer"),
    ("/v1/embeddings", {"input": [True]}, 422, "input.0: Input should be a valid integer"),
    ("/v1/embeddings", {"input": [1.0]}, 422, "input.0: Input should be a valid integer"),
    # invalid Unicode, in every text field
    ("/embed", {"inputs": LONE_SURROGATE}, 422, "inputs: invalid Unicode (a lone surrogate); send valid UTF-8 text"),
    ("/", {"inputs": ["a", LONE_SURROGATE]}, 422, "inputs.1: invalid Unicode (a lone surrogate)"),
    ("/embed", {"inputs": "a", "instruction": LONE_SURROGATE}, 422, "instruction: invalid Unicode"),
    ("/tokenize", {"inputs": [LONE_SURROGATE]}, 422, "inputs.0: invalid Unicode"),
    ("/rerank", {"query": LONE_SURROGATE, "texts": ["d"]}, 422, "query: invalid Unicode"),
    ("/rerank", {"query": "q", "texts": [LONE_SURROGATE]}, 422, "texts.0: invalid Unicode"),
    ("/v1/rerank", {"query": "q", "documents": ["d", LONE_SURROGATE]}, 422, "documents.1: invalid Unicode"),
    ("/v1/embeddings", {"input": [LONE_SURROGATE]}, 422, "input.0: invalid Unicode"),
    ("/v1/embeddings", {"input": "a", "model": LONE_SURROGATE}, 422, "model: invalid Unicode"),
    # bodies that are not JSON a server can read
    ("/embed", b'{"inputs": "\xff"}', 400, "body: not readable as JSON (invalid UTF-8, or nested too deeply); send a "
                                           "UTF-8 JSON object"),
    ("/embed", b"[" * 1000 + b"]" * 1000, 400, "send a UTF-8 JSON object"),
    # what Python's JSON reader would take from bytes: UTF-16 (by its BOM), a surrogate's UTF-8-like bytes
    ("/embed", b"\xff\xfe", 400, "body: not readable as JSON (invalid UTF-8"),
    ("/embed", '{"inputs": "a"}'.encode("utf-16"), 400, "body: not readable as JSON (invalid UTF-8"),
    ("/embed", b'{"inputs": "a\xed\xa0\x80"}', 400, "body: not readable as JSON (invalid UTF-8"),
    ("/embed", b'{"inputs": "a\x01"}', 422, "body: JSON decode error (Invalid control character at character 13)"),
    ("/embed", b'{"inputs": }', 422, "body: JSON decode error (Expecting value at character 11)"),
    ("/embed", b"", 422, "body: empty; send a JSON object"),
    ("/v1/embeddings", b"", 422, "body: empty; send a JSON object"),
    # no redirect to the route without the slash (its Location would be built from the Host header)
    ("/embed/", {"inputs": "a"}, 404, "POST /embed/ is not served; use /embed"),
    ("/v1/embeddings/", {"input": "a"}, 404, "POST /v1/embeddings/ is not served; use /v1/embeddings"),
    ("/embed", {"inputs": "a", "dimensions": 0}, 422, "dimensions: Input should be greater than or equal to 1"),
    ("/embed", {"inputs": "a", "dimensions": 10_000}, 422, "dimensions must be in 1..64 (the model's embedding size)"),
    ("/embed", {"inputs": "a", "prompt_name": "nope"}, 422, "prompt_name: Input should be 'query' or 'document'"),
    ("/embed", {"inputs": "a", "prompt_name": "query", "instruction": "x"}, 422,
     "body: send prompt_name or instruction, not both"),
    ("/embed", {"inputs": ["a", "b", "c"]}, 413, "3 inputs in one request is over the max client batch size 2"),
    ("/embed", {"inputs": "word " * 60}, 413, 'max input length of 40 tokens (prompt included); shorten it or send '
                                              '"truncate": true'),
    ("/embed", {"inputs": "x" * 3000}, 413, "larger than the payload limit (2000 bytes)"),
    ("/tokenize", {"inputs": []}, 422, "at least 1 item"),
    ("/tokenize", {"inputs": "word " * 60}, 413, 'max input length of 40 tokens (prompt included); shorten it or send '
                                                 '"truncate": true'),
    ("/tokenize", {"inputs": "a", "truncate": 1}, 422, "truncate: Input should be a valid boolean"),
    ("/tokenize", {"inputs": "a", "add_special_tokens": "no"}, 422, "add_special_tokens: Input should be a valid "
                                                                    "boolean"),
    # documents are texts or {"text": ...} objects
    ("/v1/rerank", {"query": "q", "documents": []}, 422, "documents: List should have at least 1 item"),
    ("/v1/rerank", {"query": "q", "documents": ["d", {"text": "e"}, {"title": "t"}]}, 422,
     'documents.2.text: missing or not a string; send each document as a text or as {"text": "..."}'),
    ("/v1/rerank", {"query": "q", "documents": [{"text": 5}]}, 422, "documents.0.text: missing or not a string"),
    ("/v1/rerank", {"query": "q", "documents": [["d"]]}, 422, 'documents.0: send each document as a text or as '
                                                             '{"text": "..."}'),
    ("/v1/rerank", {"query": "q", "documents": [{"text": LONE_SURROGATE}]}, 422, "documents.0.text: invalid Unicode"),
    ("/v1/embeddings", {"input": [[1, 2], []]}, 422, "input"),
    ("/v1/embeddings", {"input": [[151669]]}, 422, "token ids must be integers in 0..151668"),
    ("/v1/embeddings", {"input": [-1]}, 422, "input.0: Input should be greater than or equal to 0"),
    ("/v1/embeddings", {"input": [1.5]}, 422, "input.0: Input should be a valid integer"),
    ("/v1/embeddings", {"input": [None]}, 422, "input.0: Input should be a valid integer"),
    ("/v1/embeddings", {"input": ["a", [1]]}, 422, "input.1: Input should be a valid string"),
    ("/v1/embeddings", {"input": 5}, 422, "input: send a text, a list of texts, a list of token ids"),
    ("/v1/embeddings", {"input": [1, 2], "prompt_name": "query"}, 422, "body: prompt_name and instruction apply to "
                                                                      "texts"),
    ("/v1/embeddings", {"input": "a", "encoding_format": "hex"}, 422, "encoding_format: Input should be 'float'"),
    ("/v1/embeddings", {"input": "word " * 60}, 413, "max input length of 40 tokens (prompt included); shorten it"),
    ("/rerank", {"query": "q", "texts": ["d"]}, 404, "no reranker model; start it with --reranker SET_DIR"),
    ("/v1/rerank", {"query": "q", "documents": ["d"]}, 404, "--reranker SET_DIR"),
    ("/nowhere", {}, 404, "Not Found"),
]


@pytest.mark.parametrize("path, body, status, message", BAD_REQUESTS,
                         ids=[f"{p}-{s}-{m[:24]}" for p, _, s, m in BAD_REQUESTS])
def test_bad_requests_get_their_status_and_a_message(limited_url, path, body, status, message):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = httpx.post(f"{limited_url}{path}", content=content, headers={"content-type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == status, r.text
    assert message in error_message(r) and error_type(r) == ERROR_TYPES[status]


@pytest.mark.parametrize("content_type", [None, "application/x-www-form-urlencoded", "text/plain"])
def test_a_body_not_sent_as_json_is_a_415_naming_the_header(limited_url, content_type):
    """What `curl -d` sends, a text type, or none: as TEI answers, 415 naming the header to send."""
    for path in ("/embed", "/v1/embeddings"):
        r = httpx.post(f"{limited_url}{path}", content=b'{"inputs": "a"}', timeout=TIMEOUT,
                       headers={"content-type": content_type} if content_type else {})
        assert r.status_code == 415 and error_type(r) == ERROR_TYPES[415], r.text
        assert "send the body as JSON with the header Content-Type: application/json" in error_message(r)
    r = httpx.post(f"{limited_url}/embed", content=b'{"inputs": "a"}', timeout=TIMEOUT,
                   headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_optional_fields_take_null_for_their_default_as_tei_does(url):
    """Generated clients send null for the optional fields they leave unset."""
    with httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        for path, body in (("/embed", {"inputs": "a", "truncate": None, "dimensions": None, "prompt_name": None}),
                           ("/tokenize", {"inputs": "a", "truncate": None}),
                           ("/rerank", {"query": "q", "texts": ["d"], "truncate": None, "top_n": None}),
                           ("/v1/rerank", {"query": "q", "documents": ["d"], "truncate": None}),
                           ("/v1/embeddings", {"input": "a", "dimensions": None, "model": None, "user": None})):
            r = http.post(path, json=body)
            assert r.status_code == 200, (path, r.text)


def test_v1_models_lists_the_served_models_as_openai_does(url, offline):
    """OpenAI-compatible clients (LiteLLM, Open WebUI) discover models there: one entry per loaded model, named as the
    /v1 answers name it."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)
    models = client.models.list().data
    assert [m.id for m in models] == [offline[task].manifests[0].name for task in ("embedding", "reranker")]
    assert all(m.object == "model" and m.owned_by and m.created > 0 for m in models)
    assert client.embeddings.create(model=models[0].id, input="a").model == models[0].id


def test_limits_that_need_more_than_a_body(limited_url, sets):
    def chunks():  # no Content-Length: the limit is found while streaming
        yield b'{"inputs": "'
        for _ in range(30):
            yield b"x" * 100
        yield b'"}'

    r = httpx.post(f"{limited_url}/embed", content=chunks(), headers={"content-type": "application/json"},
                   timeout=TIMEOUT)
    assert r.status_code == 413 and "payload limit" in error_message(r)
    metrics = httpx.get(f"{limited_url}/metrics", timeout=TIMEOUT).text
    assert 'route="/embed",status="413"' in metrics and 'route="unmatched",status="413"' not in metrics
    r = httpx.get(f"{limited_url}/embed", timeout=TIMEOUT)
    assert r.status_code == 405 and error_message(r) == "GET /embed is not served; use POST"
    r = httpx.post(f"{limited_url}/health", timeout=TIMEOUT)
    assert r.status_code == 405 and set(r.headers["allow"].split(", ")) == {"GET", "HEAD"}
    for path in ("/openapi.json", "/docs"):  # FastAPI's own routes, counted as theirs
        assert httpx.get(f"{limited_url}{path}", timeout=TIMEOUT).status_code == 200
    metrics = httpx.get(f"{limited_url}/metrics", timeout=TIMEOUT).text
    assert 'route="/openapi.json",status="200"' in metrics and 'route="/docs",status="200"' in metrics
    assert 'route="unmatched",status="200"' not in metrics
    long_text = "word " * 60
    r = httpx.post(f"{limited_url}/embed", json={"inputs": long_text, "truncate": True}, timeout=TIMEOUT)
    with Embedder.from_artifacts(sets["embedding"], truncation="truncate", max_length=40) as capped:
        with pytest.warns(UserWarning, match="truncated to 40 tokens"):
            want = capped.encode([long_text])
    assert r.status_code == 200 and max_abs_diff(r.json(), want) <= 1e-6
    assert httpx.get(f"{limited_url}/health", timeout=TIMEOUT).json() == {"status": "ok"}


def test_dimensions_wider_than_the_vectors_are_refused_before_the_model_runs(sets):
    embedder = Embedder.from_artifacts(sets["embedding"])
    with served(create_app(embedder)) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        for path, body in (("/embed", {"inputs": TEXTS, "dimensions": 65}),
                           ("/v1/embeddings", {"input": TEXTS, "dimensions": 65}),
                           ("/v1/embeddings", {"input": [[1, 2, 3]], "dimensions": 65})):
            r = http.post(path, json=body)
            assert r.status_code == 422 and "dimensions must be in 1..64 (the model's embedding size), got 65" in \
                error_message(r)
        assert embedder.runner.stats.computed_tokens == 0
        assert len(http.post("/embed", json={"inputs": TEXTS, "dimensions": 64}).json()[0]) == 64
        assert embedder.runner.stats.computed_tokens > 0  # what counted nothing above counts a request that ran


@pytest.fixture(scope="module")
def instruction_set(checkpoints, tmp_path_factory):
    """An embedding set compiled for one instruction: its graph caches the query prompt's first tokens."""
    [artifact] = build(checkpoints, tmp_path_factory.mktemp("instruction"), "embedding", seq_lens=(64,),
                       instruction=SIMILARITY_INSTRUCTION)
    assert find_artifacts(artifact.parent)[0].cached_prefix
    return artifact.parent


def test_prompt_name_query_is_the_instruction_of_a_set_compiled_for_one(instruction_set):
    """As `encode_queries`: the set's fixed instruction (web search only for a set built without one), on TEI's
    routes and, as an extension field, on OpenAI's; a text without it is refused naming the field to send."""
    with Embedder.from_artifacts(instruction_set) as offline:
        want = offline.encode_queries(TEXTS[:2])
    with served(create_app(Embedder.from_artifacts(instruction_set))) as base, \
            httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        r = http.post("/embed", json={"inputs": TEXTS[:2], "prompt_name": "query"})
        assert r.status_code == 200 and max_abs_diff(r.json(), want) <= 1e-6
        for body in ({"prompt_name": "query"}, {"instruction": SIMILARITY_INSTRUCTION}):
            r = http.post("/v1/embeddings", json={"input": TEXTS[:2], **body})
            assert r.status_code == 200 and max_abs_diff([d["embedding"] for d in r.json()["data"]], want) <= 1e-6
        tokens = http.post("/tokenize", json={"inputs": "Hello", "prompt_name": "query"}).json()
        assert "".join(t["text"] for t in tokens[0]).startswith(f"Instruct: {SIMILARITY_INSTRUCTION}\nQuery:")
        for path, body in (("/embed", {"inputs": "a"}), ("/tokenize", {"inputs": "a"}),
                           ("/v1/embeddings", {"input": "a"}), ("/embed", {"inputs": "a", "instruction": "Judge"})):
            r = http.post(path, json=body)
            assert r.status_code == 422 and 'send "prompt_name": "query"' in error_message(r), r.text


def test_token_ids_without_the_cached_prompt_are_refused_and_never_fail_another_request(instruction_set):
    """A set that caches the query prompt's first tokens fails on a row without them, and with it every row of the
    batch: such token ids are refused before they are queued. A batch here takes 2 rows and waits for the second: a
    bad request sent while a good one waits would share its batch."""
    with Embedder.from_artifacts(instruction_set) as offline:
        want = offline.encode_queries(TEXTS[:2])
        query_ids = [offline.tokenize(offline.format([t], SIMILARITY_INSTRUCTION))[0][:-1] for t in TEXTS[:2]]
    app = create_app(Embedder.from_artifacts(instruction_set), limits=Limits(max_wait_ms=MAX_WAIT_MS))
    with served(app) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        waiting = {}
        first = threading.Thread(target=lambda: waiting.update(r=http.post("/v1/embeddings",
                                                                           json={"input": query_ids[0]})))
        first.start()
        wait_for(lambda: 'toolkit_queue_rows{model="embedding"} 1.0' in http.get("/metrics").text)
        bad = http.post("/v1/embeddings", json={"input": [1, 2, 3]})
        assert bad.status_code == 422, bad.text
        assert "token ids of input #0 do not start with the" in error_message(bad)
        assert '"prompt_name": "query"' in error_message(bad)
        second = http.post("/v1/embeddings", json={"input": [query_ids[1]]})  # fills the first one's batch
        first.join(TIMEOUT)
        for r, vector in ((waiting["r"], want[0]), (second, want[1])):
            assert r.status_code == 200 and max_abs_diff([r.json()["data"][0]["embedding"]], [vector]) <= 1e-6


POISON_ID = 4242  # a row holding this token id makes the backend below fail


class FailsOnPoison(Backend):
    """A real artifact backend that raises where a row holds POISON_ID (a device error, say)."""

    def __init__(self, inner: Backend):
        self.inner, self.task = inner, inner.task
        self.seq_len, self.batch = inner.seq_len, inner.batch

    def run(self, input_ids, attention_mask):
        if (input_ids == POISON_ID).any():
            raise RuntimeError("device lost\nsecond line of a long backend trace")
        return self.inner.run(input_ids, attention_mask)

    def close(self):
        self.inner.close()


def test_a_backend_failure_is_a_503_for_its_request_and_the_server_goes_on(sets, offline):
    manifests = find_artifacts(sets["embedding"])
    engines = [Engine(lambda i, dev, m=m: FailsOnPoison(open_backend(m, 1))) for m in manifests]
    flaky = Embedder(BucketedRunner(engines), load_tokenizer(manifests[0].path / "tokenizer"))
    with served(create_app(flaky)) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        for _ in range(2):
            r = http.post("/v1/embeddings", json={"input": [[1, POISON_ID, 2]]})
            assert r.status_code == 503 and "backend failed on this request (RuntimeError: device lost)" in \
                error_message(r)
            ok = http.post("/embed", json={"inputs": TEXTS})
            assert ok.status_code == 200 and max_abs_diff(ok.json(), offline["embedding"].encode(TEXTS)) <= 1e-6
        assert http.get("/health").json() == {"status": "ok"}
        assert 'route="/v1/embeddings",status="503"} 2.0' in http.get("/metrics").text


class FailsAtOnce(SchedulerObserver):
    """A hook with a bug: the scheduler stops at its first batch."""

    def batch_submitted(self, batch):
        raise RuntimeError("hook bug")


def test_a_stopped_scheduler_is_a_503_at_once_and_an_unhealthy_server(sets):
    app = create_app(Embedder.from_artifacts(sets["embedding"]))
    app.state.services.embedding().scheduler.observer = FailsAtOnce()
    with served(app) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        for _ in range(2):  # the request it stopped on, then one it refuses at once
            r = http.post("/embed", json={"inputs": TEXTS[:1]})
            assert r.status_code == 503 and "the embedding model takes no more requests (the batch scheduler stopped " \
                                             "on RuntimeError: hook bug)" in error_message(r)
        assert http.get("/health").status_code == 503


class Gated(Backend):
    """A real artifact backend that records the token ids of each batch, then waits for `gate` to run it."""

    def __init__(self, inner: Backend, gate: threading.Event, seen: set):
        self.inner, self.task = inner, inner.task
        self.seq_len, self.batch = inner.seq_len, inner.batch
        self.gate, self.seen = gate, seen

    def run(self, input_ids, attention_mask):
        self.seen.update(input_ids[attention_mask.astype(bool)].tolist())
        self.gate.wait(TIMEOUT)
        return self.inner.run(input_ids, attention_mask)

    def close(self):
        self.inner.close()


@contextmanager
def leaving_client(base: str, path: str, body: dict):
    """A client that sends a request and leaves (closes its connection) at the end of the block, unanswered."""
    content = json.dumps(body).encode()
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as connection:
        connection.sendall(b"POST %s HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\ncontent-length: "
                           b"%d\r\n\r\n%s" % (path.encode(), len(content), content))
        yield


def headers_sent(base: str, path: str, body: bytes = b"") -> HTTPConnection:
    """A POST of a JSON body of 100 bytes (declared) whose headers are sent, and `body`: the start of it at most."""
    connection = HTTPConnection(*base.removeprefix("http://").split(":"), timeout=TIMEOUT)
    connection.putrequest("POST", path)
    connection.putheader("content-type", "application/json")
    connection.putheader("content-length", "100")
    connection.endheaders(body)
    return connection


def test_a_request_over_the_concurrency_limit_is_refused_before_its_body_is_read(sets):
    """A 429 cost a whole body read and parse: a flood of 1.9 MB bodies at a full model took the server from 253 MB
    to 1 GB. A request now takes its model's place before its body is read: here a client stalled mid-body holds a
    model's only place, and a request to each route of that model, its body never sent, is refused in its route's
    error shape and counted; the place comes back when the stalled client leaves."""
    app = create_app(Embedder.from_artifacts(sets["embedding"]), Reranker.from_artifacts(sets["reranker"]),
                     Limits(max_concurrent_requests=1))
    with served(app) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as client:
        def in_flight(model: str, count: int) -> bool:
            return f'toolkit_requests_in_flight{{model="{model}"}} {count}.0' in client.get("/metrics").text

        for model, routes in (("embedding", ["/embed", "/", "/tokenize", "/v1/embeddings"]),
                              ("reranker", ["/rerank", "/v1/rerank"])):
            stalled = headers_sent(base, routes[0], b'{"inputs": ')
            wait_for(lambda: in_flight(model, 1))
            message = f"the {model} model is at its max concurrent requests (1); retry shortly"
            for route in routes:
                refused = headers_sent(base, route)
                answer = refused.getresponse()
                assert (answer.status, answer.getheader("retry-after")) == (429, "1"), route
                assert json.loads(answer.read()) == (
                    {"error": {"message": message, "type": "overloaded", "code": 429}} if route.startswith("/v1/")
                    else {"error": message, "error_type": "overloaded"}), route
                refused.close()
            stalled.close()
            wait_for(lambda: in_flight(model, 0))
        assert client.post("/embed", json={"inputs": TEXTS[:1]}).status_code == 200
        metrics = client.get("/metrics").text
    for route in ("/embed", "/", "/tokenize", "/v1/embeddings", "/rerank", "/v1/rerank"):
        assert f'toolkit_http_requests_total{{route="{route}",status="429"}} 1.0' in metrics, route
    assert 'toolkit_http_request_seconds_count{route="/v1/rerank",status_class="4xx"} 1.0' in metrics


def test_request_latencies_are_by_status_class_so_refusals_stay_apart_from_answers():
    """Under a flood the latency histogram mixed the fast 429s and the clients' 499s with the answers' 200s."""
    from toolkit.serve.metrics import ServiceMetrics

    metrics = ServiceMetrics()
    for status, seconds in ((200, 0.5), (429, 0.001), (499, 2.0), (503, 0.25)):
        metrics.answered("/embed", status, seconds)
    text = metrics.render().decode()
    for status_class, count, total in (("2xx", 1, 0.5), ("4xx", 2, 2.001), ("5xx", 1, 0.25)):
        assert f'toolkit_http_request_seconds_count{{route="/embed",status_class="{status_class}"}} {count}.0' in text
        assert f'toolkit_http_request_seconds_sum{{route="/embed",status_class="{status_class}"}} {total}' in text


def test_a_client_that_leaves_costs_no_compute_for_its_waiting_rows_and_is_counted_as_499(sets, offline):
    """Neither Starlette nor uvicorn stops a request whose client left; the app does. Its rows waiting for a batch
    (behind a slow one here: one instance) are dropped and never reach the backend; rows in a running batch finish,
    for nobody. Both requests end as nginx counts them, 499, while the slow batch still runs; the server goes on."""
    manifests = find_artifacts(sets["embedding"])
    gate, seen = threading.Event(), set()
    engines = [Engine(lambda i, dev, m=m: Gated(open_backend(m, 1), gate, seen)) for m in manifests]
    gated = Embedder(BucketedRunner(engines), load_tokenizer(manifests[0].path / "tokenizer"))
    running, waiting = 4001, 4002  # token ids that mark each leaving client's row
    try:
        with served(create_app(gated, limits=Limits(max_wait_ms=0))) as base, \
                httpx.Client(base_url=base, timeout=TIMEOUT) as http:
            def metrics() -> str:
                return http.get("/metrics").text

            with leaving_client(base, "/v1/embeddings", {"input": [1, running, 2]}):
                wait_for(lambda: running in seen)  # its batch holds the only instance
                with leaving_client(base, "/v1/embeddings", {"input": [1, waiting, 2]}):
                    wait_for(lambda: 'toolkit_queue_rows{model="embedding"} 1.0' in metrics())
            wait_for(lambda: 'route="/v1/embeddings",status="499"} 2.0' in metrics())
            assert 'toolkit_queue_rows{model="embedding"} 0.0' in metrics() and not gate.is_set()
            gate.set()
            ok = http.post("/embed", json={"inputs": TEXTS[:1]})
            assert ok.status_code == 200 and max_abs_diff(ok.json(), offline["embedding"].encode(TEXTS[:1])) <= 1e-6
            assert 'toolkit_requests_in_flight{model="embedding"} 0.0' in metrics()
    finally:
        gate.set()
    assert running in seen and waiting not in seen


def test_a_request_the_server_cancels_after_its_client_left_stays_cancelled():
    """The cancellation of a request whose client had left (its app already being cancelled) was swallowed: the
    server's own cancellation (a shutdown) then never reached it."""
    async def main():
        cleaning_up = asyncio.Event()

        async def app(scope, receive, send):
            await receive()
            try:
                await asyncio.Event().wait()
            finally:  # the client left: the app is cancelled, and the server cancels the request during its cleanup
                cleaning_up.set()
                await asyncio.sleep(TIMEOUT)

        messages = [{"type": "http.request", "body": b""}, {"type": "http.disconnect"}]

        async def receive():
            return messages.pop(0) if messages else await asyncio.Event().wait()

        request = asyncio.ensure_future(StopWhenClientLeaves(app)({"type": "http"}, receive, None))
        await asyncio.wait_for(cleaning_up.wait(), TIMEOUT)
        request.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(request, TIMEOUT)

    asyncio.run(main())


def test_limits_take_numpy_integers_as_every_other_option_does():
    """`Limits.check` refused np.int64 (isinstance int); they are kept as ints, which /info answers as JSON."""
    limits = Limits(max_batch_tokens=np.int64(4096), max_input_length=np.int32(40)).check()
    assert json.loads(json.dumps(vars(limits)))["max_batch_tokens"] == 4096 and limits.max_input_length == 40
    with pytest.raises(ToolkitError, match=r"^--max-input-length must be an integer >= 1, got 0$"):
        Limits(max_input_length=np.int64(0)).check()


def test_the_batch_token_budget_is_checked_against_the_max_input_length_before_any_model_loads(sets):
    """A batch's token budget must hold the longest row: the --max-input-length where one is given, else the largest
    SEQ (64)."""
    assert model_sets(sets["embedding"], None, Limits(max_batch_tokens=40, max_input_length=32)) == \
        {Embedder: (sets["embedding"], 32)}
    with pytest.raises(ToolkitError, match=r"^--max-batch-tokens must be an integer >= the max input length 64, got "
                                           r"40"):
        model_sets(sets["embedding"], None, Limits(max_batch_tokens=40))


def test_one_max_input_length_caps_each_model_at_its_own_largest_seq(sets):
    """The embedding set's largest SEQ is 64, the reranker's 128: 100 caps the reranker and leaves the embedding
    model at 64; only a value that neither set takes is refused."""
    assert model_sets(sets["embedding"], sets["reranker"], Limits(max_input_length=100)) == \
        {Embedder: (sets["embedding"], 64), Reranker: (sets["reranker"], 100)}
    assert model_sets(sets["embedding"], sets["reranker"], Limits()) == \
        {Embedder: (sets["embedding"], None), Reranker: (sets["reranker"], None)}
    with pytest.raises(ToolkitError, match=r"^--max-input-length must be an integer in 1\.\.128 \(the largest SEQ in "
                                           r".*; each model is capped at its own\), got 129$"):
        model_sets(sets["embedding"], sets["reranker"], Limits(max_input_length=129))


def test_a_max_input_length_too_short_for_the_prompt_is_named_as_the_cause(sets):
    """Below the set's largest SEQ, the fix is a larger max input length, not a larger SEQ."""
    with pytest.raises(ToolkitError, match=r"raise max_length \(a service's --max-input-length\) to \d+ or more \(the "
                                           r"set takes up to 128\)$"):
        Reranker.from_artifacts(sets["reranker"], max_length=20)
    with Embedder.from_artifacts(sets["embedding"], max_length=20) as capped:
        with pytest.raises(ToolkitError, match=r"shorten the instruction, or raise max_length \(a service's "
                                               r"--max-input-length\) to \d+ or more \(the set takes up to 64\)$"):
            capped.format(["hi"], WEB_SEARCH_INSTRUCTION)
    with Embedder.from_artifacts(sets["embedding"]) as uncapped:  # at the largest SEQ: a larger SEQ is the fix
        with pytest.raises(ToolkitError, match=r"shorten the instruction, or compile with --seq \d+ or more$"):
            uncapped.format(["hi"], "word " * 70)


def test_a_request_cut_off_by_the_graceful_timeout_is_a_503_in_the_error_shape(sets):
    """A client that stalls mid-body while the server stops: past the graceful timeout uvicorn cancels its request,
    which it answered with a plain-text 500 and the cancellation's traceback in the log."""
    app = create_app(Embedder.from_artifacts(sets["embedding"]))
    server = DrainingServer(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=0.1),
                            app.state.services.drain)
    logged = []
    handler = logging.Handler()
    handler.emit = logged.append
    logging.getLogger("uvicorn.error").addHandler(handler)
    try:
        with served(app, server) as base, \
                socket.create_connection(("127.0.0.1", int(base.rsplit(":", 1)[1])), timeout=TIMEOUT) as client:
            client.sendall(b'POST /embed HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n'
                           b'content-length: 100\r\n\r\n{"inputs": ')
            wait_for(lambda: server.server_state.tasks)  # the request is running, waiting for the rest of its body
            server.handle_exit(signal.SIGTERM, None)
            answer = b""
            while chunk := client.recv(65536):
                answer += chunk
    finally:
        logging.getLogger("uvicorn.error").removeHandler(handler)
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 503 "), answer
    assert json.loads(body) == {"error": "the server is shutting down and stopped this request before it finished; "
                                         "retry it", "error_type": "unavailable"}
    assert not [r for r in logged if r.exc_info], [r.getMessage() for r in logged]


def test_the_tokenizers_are_set_up_before_the_first_request(sets, monkeypatch):
    """Their lazy setup (a scan of the vocabulary, ~0.1 s for Qwen3's) would block the event loop under the first
    request; a SIGTERM then resets requests already sent."""
    import toolkit.api

    app = create_app(Embedder.from_artifacts(sets["embedding"]), Reranker.from_artifacts(sets["reranker"]))

    def scan_on_a_request(tokenizer):
        raise AssertionError("the vocabulary was scanned on a request")

    monkeypatch.setattr(toolkit.api, "max_token_chars", scan_on_a_request)
    with served(app) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        assert http.post("/embed", json={"inputs": TEXTS}).status_code == 200
        assert http.post("/rerank", json={"query": QUERY, "texts": DOCS}).status_code == 200


def test_a_reranker_compiled_for_its_instruction_says_so_and_answers_another_with_a_422(tvm_artifacts):
    """At SEQ 128 the build cached the web-search instruction: `/info` names it, requests without an instruction (or
    with it) are scored, one with another instruction is a 422 naming the fix."""
    with Reranker.from_artifacts(tvm_artifacts["reranker"][0]) as offline:
        expected = offline.score([(QUERY, d) for d in DOCS])
    app = create_app(reranker=Reranker.from_artifacts(tvm_artifacts["reranker"][0]))
    with served(app) as base, httpx.Client(base_url=base, timeout=TIMEOUT) as http:
        assert http.get("/info").json()["models"]["reranker"]["instruction"] == WEB_SEARCH_INSTRUCTION
        for body in ({}, {"instruction": WEB_SEARCH_INSTRUCTION}):
            ok = http.post("/rerank", json={"query": QUERY, "texts": DOCS, **body})
            assert ok.status_code == 200
            assert max(abs(r["score"] - expected[r["index"]]) for r in ok.json()) <= 1e-6
        r = http.post("/rerank", json={"query": QUERY, "texts": DOCS, "instruction": "Judge"})
        assert r.status_code == 422 and "compiled for the instruction" in error_message(r)
        assert "--instruction" in error_message(r)


def test_sigterm_finishes_requests_in_flight_then_exits_0(sets, offline):
    """A request of one row (a batch takes 2) waits in the batch scheduler (max wait 60 s, past uvicorn's 30 s
    graceful timeout) when SIGTERM comes: the server stops accepting connections, runs it at once, answers it and
    exits 0 (it used to wait out its max wait, and past the graceful timeout uvicorn cancelled it: a 500)."""
    with serve_process("--embedding", sets["embedding"], "--max-wait-ms", 60000) as (base, server):
        answer = {}
        request = threading.Thread(target=lambda: answer.update(
            r=httpx.post(f"{base}/embed", json={"inputs": TEXTS[:1]}, timeout=TIMEOUT)))
        request.start()
        wait_for(lambda: 'toolkit_queue_rows{model="embedding"} 1.0' in httpx.get(f"{base}/metrics").text)
        server.send_signal(signal.SIGTERM)
        wait_for(lambda: refuses_connections(base))
        request.join(TIMEOUT)
        assert server.wait(TIMEOUT) == 0
    assert answer["r"].status_code == 200
    assert max_abs_diff(answer["r"].json(), offline["embedding"].encode(TEXTS[:1])) <= 1e-6


def refuses_connections(base: str) -> bool:
    try:
        httpx.get(f"{base}/health", timeout=1)
    except httpx.ConnectError:
        return True
    return False


CORES = os.cpu_count() or 1


@pytest.mark.parametrize("args, message", [
    ([], "give at least one model"),
    (["--embedding", "/no/such/set"], "--embedding /no/such/set: no such directory"),
    (["--embedding", "SET", "--max-wait-ms", "-1"], "--max-wait-ms must be a number of milliseconds in 0..60000"),
    (["--embedding", "SET", "--max-wait-ms", "inf"], "--max-wait-ms must be a number of milliseconds in 0..60000, got "
                                                     "inf"),
    (["--embedding", "SET", "--max-wait-ms", "nan"], "--max-wait-ms must be a number of milliseconds in 0..60000, got "
                                                     "nan"),
    (["--embedding", "SET", "--host", "999.1.1.1"], "--host 999.1.1.1: "),
    (["--embedding", "SET", "--max-concurrent-requests", "0"], "--max-concurrent-requests must be an integer >= 1"),
    (["--embedding", "SET", "--replicas", "2"], "--replicas and --ray-address need --ray"),
    (["--embedding", "SET", "--ray", "--ray-address", ""], "--ray-address is empty; pass a head's HOST:PORT, or omit "
                                                           "it for a local Ray instance"),
    (["--embedding", "SET", "--port", "70000"], "--port must be at most 65535"),
    (["--embedding", "SET", "--threads", str(CORES + 1)], f"--threads {CORES + 1} is more than this machine's {CORES} "
                                                          f"cores"),
    (["--embedding", "SET", "--ray", "--replicas", str(CORES + 1)], f"--replicas {CORES + 1} is more than this "
                                                                    f"machine's {CORES} cores"),
    (["--embedding", "SET", "--instances", "two"], "'two' is neither an integer >= 1 nor 'auto'"),
    (["--embedding", "SET", "--max-input-length", "1000"], "--max-input-length must be an integer in 1..64 (the "
                                                           "largest SEQ in "),
    (["--embedding", "SET", "--reranker", "RERANKER_SET", "--max-input-length", "1000"],
     "--max-input-length must be an integer in 1..128 (the largest SEQ in "),
    (["--embedding", "RERANKER_SET"], "holds reranker artifacts, not embedding ones: pass it as --reranker"),
    (["--embedding", "SET", "--max-batch-tokens", "10"], "--max-batch-tokens must be an integer >= the max input "
                                                         "length 64, got 10; raise it to at least 64"),
])
def test_bad_serve_flags_are_one_line_errors(sets, args, message):
    args = [{"SET": str(sets["embedding"]), "RERANKER_SET": str(sets["reranker"])}.get(a, a) for a in args]
    result = CliRunner().invoke(main, ["serve", *args])
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output, result.output


def test_a_port_in_use_is_refused_before_any_model_loads(sets, monkeypatch):
    def load(options):
        raise AssertionError("models loaded before the port was bound")

    monkeypatch.setattr("toolkit.serve.server.build_app", load)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["serve", "--embedding", str(sets["embedding"]), "--port", str(port)])
    assert result.exit_code == 2, result.output
    assert f"cannot listen on 127.0.0.1:{port} (Address already in use); pass a free --port" in result.output


def test_port_0_serves_on_a_free_port_and_prints_it(sets):
    with tempfile.TemporaryFile("w+") as log:
        def output() -> str:
            log.seek(0)
            return log.read()

        server = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", "--embedding", str(sets["embedding"]),
                                   "--port", "0"], stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            wait_for(lambda: "serving on" in output())
            url = re.search(r"serving on (http://127\.0\.0\.1:\d+) ", output()).group(1)
            wait_for(lambda: httpx.get(f"{url}/health").status_code == 200)
        finally:
            server.send_signal(signal.SIGTERM)
            assert server.wait(TIMEOUT) == 0, output()
