"""Request and response bodies of the service, as pydantic models: TEI's shapes (`/embed`, `/rerank`, `/tokenize`) and
OpenAI's / Cohere's (`/v1/embeddings`, `/v1/rerank`). A body that does not match is refused with 422 before any work;
types are strict (`true` is not 1, `"8"` not 8, `"false"` not a boolean), texts must be valid Unicode, and unknown
fields are ignored, as the services these clients were written for do."""
from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


def valid_unicode(text: str) -> str:
    """Refuse a text holding a lone UTF-16 surrogate (JSON's "\\ud800"): no tokenizer, and no UTF-8 answer, takes it."""
    try:
        text.encode()
    except UnicodeEncodeError:
        raise PydanticCustomError("invalid_unicode", "invalid Unicode (a lone surrogate); send valid UTF-8 text") \
            from None
    return text


NonEmpty = Field(min_length=1)
Text = Annotated[str, AfterValidator(valid_unicode)]
Texts = Annotated[list[Text], NonEmpty]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], NonEmpty]
Count = Annotated[int, Field(ge=1)]
# TEI's `truncate` is optional (null: false), and generated clients send null for the optional fields they leave unset
Truncate = Annotated[bool, BeforeValidator(lambda value: False if value is None else value)]


# The tags of the unions below: pydantic names the alternative a value was read as in an error's location, which the
# one-line message leaves out (so no field of a body may share a tag's name)
UNION_TAGS = frozenset({"string", "strings", "ids", "id_lists", "object"})


def text_or_texts_shape(value) -> str | None:
    """Which alternative of a text-or-texts union a value is meant as (None: neither), so that a bad value gets the
    errors of that one alternative, not of every one."""
    return "string" if isinstance(value, str) else "strings" if isinstance(value, list) else None


def input_shape(value) -> str | None:
    """Which alternative of OpenAI's `input` a value is meant as: a list by its first item."""
    if not isinstance(value, list) or not value:
        return text_or_texts_shape(value)
    return "strings" if isinstance(value[0], str) else "id_lists" if isinstance(value[0], list) else "ids"


TextOrTexts = Annotated[Union[Annotated[Text, Tag("string")], Annotated[Texts, Tag("strings")]],
                        Discriminator(text_or_texts_shape, custom_error_type="input_shape",
                                      custom_error_message="send a text or a list of texts")]
TokenIdLists = Annotated[list[TokenIds], NonEmpty]
Input = Annotated[Union[Annotated[Text, Tag("string")], Annotated[Texts, Tag("strings")],
                        Annotated[TokenIds, Tag("ids")], Annotated[TokenIdLists, Tag("id_lists")]],
                  Discriminator(input_shape, custom_error_type="input_shape",
                                custom_error_message="send a text, a list of texts, a list of token ids (integers >= "
                                                     "0) or a list of such lists")]


class StrictBody(BaseModel):
    """A request body: no coercion between JSON types."""

    model_config = ConfigDict(strict=True)


class QueryFormat(StrictBody):
    """How texts are read: bare (documents), or as queries with an instruction given by text or by prompt name
    (sentence-transformers', as Qwen3-Embedding's config_sentence_transformers.json defines them; the service says
    which instruction "query" is)."""

    prompt_name: Literal["query", "document"] | None = None
    instruction: Text | None = None

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

    inputs: TextOrTexts
    normalize: bool = True
    truncate: Truncate = False
    dimensions: Count | None = None


class TokenizeRequest(QueryFormat):
    """TEI `POST /tokenize`: the tokens `/embed` would run for the same fields, `truncate` included (an input too long
    without it is refused as `/embed` refuses it); without `add_special_tokens`, without the closing <|endoftext|>: the
    token ids `/v1/embeddings` takes for the text."""

    inputs: TextOrTexts
    add_special_tokens: bool = True
    truncate: Truncate = False


class Token(BaseModel):
    """One token of a tokenised input: `start` and `stop` bound the characters of the input text it comes from
    (`text[start:stop]`; a token holding part of a character's UTF-8 bytes covers that character), null for a token
    of the prompt around the text (the instruction's, the closing <|endoftext|>). The tokenizer's NFC normalisation
    can leave a character covered by no token: in "ae\\u0301" the token of the composed é covers the e alone (1, 2),
    not the combining accent after it."""

    id: int
    text: str
    special: bool
    start: int | None
    stop: int | None


class RerankRequest(StrictBody):
    """TEI `POST /rerank` (plus `top_n` and the reranker's `instruction`)."""

    query: Text
    texts: Texts
    raw_scores: bool = False
    return_text: bool = False
    truncate: Truncate = False
    top_n: Count | None = None
    instruction: Text | None = None


class RankedText(BaseModel):
    """One text of a `/rerank` answer: its index in `texts`, its score (P(yes), or log-odds with raw_scores)."""

    index: int
    score: float
    text: str | None = None


# ---- OpenAI / Cohere ------------------------------------------------------------------------------------------------
class EmbeddingsRequest(QueryFormat):
    """OpenAI `POST /v1/embeddings`: `input` is a text, texts, one input's token ids, or several inputs' token ids;
    texts take TEI's `prompt_name` / `instruction` as extension fields (a set compiled for one instruction needs it),
    token ids hold the prompt already. `model` is not checked: the answer names the served set."""

    input: Input
    model: Text | None = None
    dimensions: Count | None = None
    encoding_format: Literal["float", "base64"] = "float"
    user: Text | None = None

    @model_validator(mode="after")
    def query_format_for_texts_only(self) -> "EmbeddingsRequest":
        """Refuse a prompt name or instruction for token ids (they would be ignored)."""
        if self.texts() is None and (self.prompt_name is not None or self.instruction is not None):
            raise PydanticCustomError("query_format_with_token_ids", "prompt_name and instruction apply to texts; "
                                      "send the token ids of the whole query, instruction included, without them")
        return self

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


class DocumentObject(StrictBody):
    """A document sent as an object, as Cohere's and Jina's clients may: its `text` (other fields are ignored)."""

    # validated when missing too: then it gets this field's error, with the fix
    text: Text = Field(default=None, validate_default=True)

    @field_validator("text", mode="before")
    @classmethod
    def a_string(cls, value):
        """Refuse a missing or non-string text, naming both forms a document takes."""
        if not isinstance(value, str):
            raise PydanticCustomError("document_text", 'missing or not a string; send each document as a text or as '
                                                       '{"text": "..."}')
        return value


def document_shape(value) -> str | None:
    """Which alternative of a document a value is meant as (None: neither)."""
    return "string" if isinstance(value, str) else "object" if isinstance(value, dict) else None


DocumentInput = Annotated[Union[Annotated[Text, Tag("string")], Annotated[DocumentObject, Tag("object")]],
                          Discriminator(document_shape, custom_error_type="document_shape",
                                        custom_error_message='send each document as a text or as {"text": "..."}')]


class DocumentsRerankRequest(StrictBody):
    """Cohere / Jina `POST /v1/rerank` (plus the reranker's `instruction` and TEI's `truncate`); documents are texts,
    objects `{"text": ...}`, or both. `model` is not checked: the answer names the served set."""

    query: Text
    documents: Annotated[list[DocumentInput], NonEmpty]
    model: Text | None = None
    top_n: Count | None = None
    return_documents: bool = False
    truncate: Truncate = False
    instruction: Text | None = None

    def texts(self) -> list[str]:
        """The documents' texts, in order."""
        return [d if isinstance(d, str) else d.text for d in self.documents]


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
