"""The OpenAI wire schemas the server accepts and returns, and the one error object.

Requests are validated from the raw JSON body in strict mode (a string where a number belongs is a 400,
not a silent conversion). Fields the OpenAI API defines but this model cannot honour are refused by name
(ServeError 400) in app.py rather than ignored; unknown extra fields are ignored, as OpenAI does.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_SEED = 2**63 - 1  # the CLI's seed range


class ServeError(Exception):
    """A request the server refuses or could not serve: HTTP status + the OpenAI error object's fields."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


# -- chat ------------------------------------------------------------------------------------------
class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ImageURL(_Strict):
    url: str
    detail: str | None = None


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatCompletionRequest(_Strict):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(default=1, ge=1)
    logprobs: bool | None = None
    # extension (as vLLM's): the end-of-sentence token does not end the answer (fixed-length load tests)
    ignore_eos: bool = False


# -- images ----------------------------------------------------------------------------------------
class ImageGenerationRequest(_Strict):
    prompt: str
    model: str | None = None
    n: int = Field(default=1, ge=1)
    size: str | None = None
    response_format: str | None = None
    output_format: str | None = None
    stream: bool = False
    partial_images: int | None = Field(default=None, ge=0, le=3)
    # extensions (as vLLM-Omni's image API): the generator's seed, the CFG weight, the Euler step count
    seed: int | None = Field(default=None, ge=0, le=MAX_SEED)
    guidance_scale: float | None = Field(default=None, ge=-100.0, le=100.0, allow_inf_nan=False)
    num_inference_steps: int | None = Field(default=None, ge=1, le=1000)


def parse(model: type[BaseModel], body: bytes) -> Any:
    """Raw JSON body -> the request model, or a 400 naming the first bad field."""
    try:
        return model.model_validate_json(body)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise ServeError(400, f"the body is not valid JSON: {err['msg']}", code="invalid_json") from None
        if err["type"] == "model_type" and not err["loc"]:
            raise ServeError(400, "the body must be a JSON object", code="invalid_json") from None
        loc = ".".join(str(p) for p in err["loc"] if not _is_union_tag(p))
        raise ServeError(400, f"{loc or 'body'}: {err['msg']}", param=loc or None, code="invalid_value") from None


def _is_union_tag(p: Any) -> bool:
    """pydantic names the union member it tried in the location (e.g. 'list[...]', 'str', 'text'); a field
    path is clearer without them."""
    return isinstance(p, str) and (p in ("str", "int", "float", "bool", "text", "image_url") or "[" in p)
