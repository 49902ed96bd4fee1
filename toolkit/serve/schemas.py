"""Request and response bodies of the service, as pydantic models: TEI's shapes (`/embed`, `/rerank`, `/tokenize`) and
OpenAI's / Cohere's (`/v1/embeddings`, `/v1/rerank`). A body that does not match is refused with 422 before any work;
unknown fields are ignored, as the services these clients were written for do."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, Field, model_validator
from pydantic_core import PydanticCustomError

NonEmpty = Field(min_length=1)
Texts = Annotated[list[str], NonEmpty]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], NonEmpty]
Count = Annotated[int, Field(ge=1)]


class QueryFormat(BaseModel):
    """How texts are read: bare (documents), or as queries with an instruction given by text or by prompt name
    (sentence-transformers', as Qwen3-Embedding's config_sentence_transformers.json defines them; the service says
    which instruction "query" is)."""

    prompt_name: Literal["query", "document"] | None = None
    instruction: str | None = None

    @model_validator(mode="after")
    def prompt_name_or_instruction(self) -> "QueryFormat":
        """Refuse a prompt name together with an instruction."""
        if self.prompt_name is not None and self.instruction is not None:
            raise PydanticCustomError("prompt_name_and_instruction", "send prompt_name or instruction, not both")
        return self


def as_texts(inputs: str | list[str]) -> list[str]:
    """A single text or a list of them, as a list."""
    return [inputs] if isinstance(inputs, str) else inputs


# ---- TEI ------------------------------------------------------------------------------------------------------------
class EmbedRequest(QueryFormat):
    """TEI `POST /embed` (also `POST /`, where Hugging Face's InferenceClient sends feature extraction)."""

    inputs: str | Texts
    normalize: bool = True
    truncate: bool = False
    dimensions: Count | None = None


class TokenizeRequest(QueryFormat):
    """TEI `POST /tokenize`: the tokens `/embed` would run for the same fields."""

    inputs: str | Texts


class Token(BaseModel):
    """One token of a tokenised input."""

    id: int
    text: str
    special: bool


class RerankRequest(BaseModel):
    """TEI `POST /rerank` (plus `top_n` and the reranker's `instruction`)."""

    query: str
    texts: Texts
    raw_scores: bool = False
    return_text: bool = False
    truncate: bool = False
    top_n: Count | None = None
    instruction: str | None = None


class RankedText(BaseModel):
    """One text of a `/rerank` answer: its index in `texts`, its score (P(yes), or log-odds with raw_scores)."""

    index: int
    score: float
    text: str | None = None


# ---- OpenAI / Cohere ------------------------------------------------------------------------------------------------
class EmbeddingsRequest(BaseModel):
    """OpenAI `POST /v1/embeddings`: `input` is a text, texts, one input's token ids, or several inputs' token ids."""

    input: str | Texts | TokenIds | Annotated[list[Annotated[list[Annotated[int, Field(ge=0)]], NonEmpty]], NonEmpty]
    model: str | None = None
    dimensions: Count | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: str | None = None

    def texts(self) -> list[str] | None:
        """The input texts, or None when the input is token ids."""
        if isinstance(self.input, str) or isinstance(self.input[0], str):
            return as_texts(self.input)
        return None

    def token_ids(self) -> list[list[int]]:
        """The input as token-id lists, one per input (only when `texts()` is None)."""
        return [self.input] if isinstance(self.input[0], int) else self.input


class Embedding(BaseModel):
    """One vector of `/v1/embeddings`: floats, or base64 of little-endian float32."""

    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class EmbeddingsUsage(BaseModel):
    """Tokens the request ran (prompt tokens included)."""

    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    """OpenAI's embeddings list."""

    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingsUsage


class DocumentsRerankRequest(BaseModel):
    """Cohere / Jina `POST /v1/rerank` (plus the reranker's `instruction` and TEI's `truncate`)."""

    query: str
    documents: Texts
    model: str | None = None
    top_n: Count | None = None
    return_documents: bool = False
    truncate: bool = False
    instruction: str | None = None


class Document(BaseModel):
    """A returned document."""

    text: str


class RerankResult(BaseModel):
    """One document of a `/v1/rerank` answer, best first."""

    index: int
    relevance_score: float
    document: Document | None = None


class RerankUsage(BaseModel):
    """Tokens the request ran."""

    total_tokens: int


class RerankResponse(BaseModel):
    """Cohere / Jina's rerank answer."""

    model: str
    results: list[RerankResult]
    usage: RerankUsage
