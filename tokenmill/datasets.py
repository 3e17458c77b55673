"""Streaming JSONL reader: dataset lines → validated :class:`DatasetRow` objects.

Every problem is a :class:`~tokenmill.errors.DatasetError` naming file, line and field, raised before
any model loads. Rows are streamed so a million-line file never sits in memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO

from tokenmill import dataset_fields as fields
from tokenmill import request_contract as contract
from tokenmill import responses_contract, tool_calls, tools_contract
from tokenmill.dataset_fields import FieldError, Template, compile_template, describe, show
from tokenmill.errors import DatasetError, UsageError
from tokenmill.rows import CHAT, COMPLETIONS, EMBEDDINGS, GENERATION_ENDPOINTS, RESPONSES, DatasetRow, SamplingParams


@dataclass(frozen=True)
class InvalidLine:
    """A rejected line, yielded instead of raised when the caller asked to skip invalid lines.

    ``custom_id`` is the line's own id when it could be read before the line was rejected.
    """

    line: int
    error: DatasetError
    custom_id: str | None = None


@dataclass(frozen=True)
class DatasetSummary:
    """What a validation pass found; ``invalid`` keeps the first few, ``invalid_count`` counts them all."""

    rows: int
    invalid: list[InvalidLine]
    invalid_dropped: int = 0

    @property
    def invalid_count(self) -> int:
        return len(self.invalid) + self.invalid_dropped


MAX_LINE_BYTES = 32 * 2**20
MAX_INT_DIGITS = 4300  # Python's default int-str limit
_SNIFF_BYTES = 8192
_BOM = b"\xef\xbb\xbf"
_MAGIC: tuple[tuple[bytes, str], ...] = (
    (b"\x1f\x8b", "a gzip file (decompress it first)"),
    (b"PK\x03\x04", "a zip archive (extract it first)"),
    (b"\x28\xb5\x2f\xfd", "a zstd file (decompress it first)"),
    (b"\xfd7zXZ\x00", "an xz file (decompress it first)"),
    (b"PAR1", "a Parquet file (convert it to JSONL)"),
    (b"\xff\xfe", "UTF-16 text (save it as UTF-8)"),
    (b"\xfe\xff", "UTF-16 text (save it as UTF-8)"),
)


class _NonStandardNumber(ValueError):
    pass


def read_dataset(
    path: str | Path,
    *,
    template: str | None = None,
    text_field: str | None = None,
    defaults: SamplingParams | None = None,
    skip_invalid: bool = False,
    ignored: contract.Ignored | None = None,
    line_model: contract.LineModel | None = None,
) -> Iterator[DatasetRow | InvalidLine]:
    """Yield rows of a JSONL file in order. Raises DatasetError on the first bad line unless skip_invalid.

    File-level problems (missing, unreadable, binary, empty) and a bad template are raised at call time,
    not at the first ``next()``, so a caller fails before it has started anything. With a template or
    ``text_field`` the object is data, not a request: its sampling-looking keys are ignored and every row
    gets ``defaults``. With both, ``{text}`` in the template reads ``text_field``. A request field
    tokenmill does not know is a line error, unless ``ignored`` is given: then it is counted there.
    """
    name = str(path)
    if text_field is not None and not text_field:
        raise UsageError("--field needs a field name")
    builder = _RowBuilder(
        compile_template(template) if template is not None else None,
        text_field,
        defaults or SamplingParams(),
        ignored,
        line_model,
    )
    _check_file(Path(path), name)
    return _rows(Path(path), name, builder, skip_invalid)


def validate_dataset(
    path: str | Path,
    *,
    template: str | None = None,
    text_field: str | None = None,
    defaults: SamplingParams | None = None,
    keep_invalid: int = 1000,
) -> DatasetSummary:
    """Read the whole file before any model loads; memory stays bounded however many lines are bad."""
    rows = 0
    invalid: list[InvalidLine] = []
    dropped = 0
    items = read_dataset(path, template=template, text_field=text_field, defaults=defaults, skip_invalid=True)
    for item in items:
        if isinstance(item, DatasetRow):
            rows += 1
        elif len(invalid) < keep_invalid:
            invalid.append(item)
        else:
            dropped += 1
    return DatasetSummary(rows=rows, invalid=invalid, invalid_dropped=dropped)


def _check_file(path: Path, name: str) -> None:
    with _open(path, name) as fh:
        try:
            head = fh.read(_SNIFF_BYTES)
        except OSError as exc:
            raise DatasetError(name, f"read failed: {exc.strerror or type(exc).__name__}") from None
    if not head:
        raise DatasetError(name, "the file is empty (no rows)")
    for magic, what in _MAGIC:
        if head.startswith(magic):
            raise DatasetError(name, f"looks like {what}, expected JSONL text")
    if head.startswith(b"BZh") and head[4:10] == b"1AY&SY":
        raise DatasetError(name, "looks like a bzip2 file (decompress it first), expected JSONL text")
    if b"\x00" in head.split(b"\n", 1)[0]:  # NUL on a later line is that line's error, not the file's
        raise DatasetError(name, "looks like a binary file, expected JSONL text")


def _open(path: Path, name: str) -> BinaryIO:
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise DatasetError(name, "file not found") from None
    except IsADirectoryError:
        raise DatasetError(name, "is a directory, expected a JSONL file") from None
    except PermissionError:
        raise DatasetError(name, "permission denied") from None
    except OSError as exc:
        raise DatasetError(name, f"cannot open: {exc.strerror or type(exc).__name__}") from None


def _rows(path: Path, name: str, builder: _RowBuilder, skip_invalid: bool) -> Iterator[DatasetRow | InvalidLine]:
    seen: dict[str, int] = {}
    produced = 0
    for line, obj in json_lines(path, name):
        produced += 1
        own_id = None
        try:
            if isinstance(obj, FieldError):
                raise obj
            custom_id = fields.row_id(obj, line)
            first = seen.get(custom_id)
            if first is not None:
                dup = f"duplicate id {show(custom_id)} (first used on line {first})"
                raise FieldError(dup, fields.id_key(obj))
            own_id = custom_id if fields.id_key(obj) else None
            row = builder.build(line, custom_id, obj)
        except FieldError as exc:
            err = DatasetError(name, exc.message, line, exc.field)
            if not skip_invalid:
                raise err from None
            yield InvalidLine(line, err, own_id)
            continue
        seen[row.custom_id] = line
        yield row
    if not produced:
        raise DatasetError(name, "has no rows (only blank lines)")


def json_lines(path: Path, name: str, *, limit: int | None = None) -> Iterator[tuple[int, dict[str, Any] | FieldError]]:
    """Each non-blank line of a JSONL file as (1-based line, its object or why it is not one).

    The one reader of JSONL lines: ``run``, ``submit`` (choosing the model) and ``serve`` (validating a
    batch) all read through it, so a hostile line — nested a million deep, not UTF-8, a number with a
    million digits, NaN, longer than :data:`MAX_LINE_BYTES` — is the same line error on every path and
    never an exception. ``limit`` stops after that many physical lines.
    """
    with _open(path, name) as fh:
        for line, raw in _lines(fh, name):
            if limit is not None and line > limit:
                return
            if raw is not None and not raw.strip():
                continue
            try:
                yield line, parse_line(raw)
            except FieldError as exc:
                yield line, exc


def _lines(fh: BinaryIO, name: str) -> Iterator[tuple[int, bytes | None]]:
    """Physical lines, 1-based; None stands for a line too long to hold, which is skipped unread."""
    line = 0
    try:
        while raw := fh.readline(MAX_LINE_BYTES + 1):
            line += 1
            if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
                while raw and not raw.endswith(b"\n"):
                    raw = fh.readline(2**20)
                yield line, None
            else:
                yield line, raw
    except OSError as exc:
        raise DatasetError(name, f"read failed: {exc.strerror or type(exc).__name__}", line + 1) from None


def parse_line(raw: bytes | None) -> dict[str, Any]:
    """One line's bytes → its JSON object, or a FieldError saying why not (None: a line over the cap)."""
    if raw is None:
        raise FieldError(f"line is longer than {MAX_LINE_BYTES // 2**20} MiB")
    if raw.startswith(_BOM):
        raw = raw[len(_BOM) :]
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start]
        raise FieldError(f"invalid JSON: invalid UTF-8 byte 0x{bad:02x} at byte column {exc.start + 1}") from None
    try:
        obj = _DECODER.decode(text)
    except json.JSONDecodeError as exc:
        raise FieldError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    except _NonStandardNumber as exc:
        raise FieldError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise FieldError("invalid JSON: nested too deeply") from None
    except ValueError:  # the interpreter's own integer-digit limit, should it be lower than ours
        raise FieldError("invalid JSON: a number has too many digits") from None
    if not isinstance(obj, dict):
        raise FieldError(f"expected a JSON object, got {fields.json_type(obj)}")
    return obj


def _refuse_constant(name: str) -> Any:
    raise _NonStandardNumber(f"{name} is not a JSON value (use a number or null)")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        shown = text if len(text) <= 24 else text[:24] + "…"
        raise _NonStandardNumber(f"the number {shown} is too large (beyond a 64-bit float)")
    return value


def _bounded_int(text: str) -> int:
    """Python's own cap on integer digits is a process-wide setting that may be off; ours is not."""
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _NonStandardNumber(f"a number has too many digits (more than {MAX_INT_DIGITS})")
    return int(text)


# json.loads with options builds a decoder per call; one shared decoder is reentrant
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float, parse_int=_bounded_int)


class _RowBuilder:
    """Turns one parsed object into a row; all choices that depend on the read options live here."""

    def __init__(
        self,
        template: Template | None,
        text_field: str | None,
        defaults: SamplingParams,
        ignored: contract.Ignored | None = None,
        line_model: contract.LineModel | None = None,
    ) -> None:
        self.ignored = ignored
        self.line_model = line_model
        self.template = template
        self.text_field = text_field
        self.defaults = defaults
        self._params_seen: dict[tuple[tuple[str, Any], ...], SamplingParams] = {}
        self._kind = _JobKind()

    def build(self, line: int, custom_id: str, obj: dict[str, Any]) -> DatasetRow:
        row = self._build(line, custom_id, obj)
        self._kind.check(row)
        return row

    def _build(self, line: int, custom_id: str, obj: dict[str, Any]) -> DatasetRow:
        if self.template is not None or self.text_field is not None:
            return self._from_data(line, custom_id, obj)
        if "body" in obj or "url" in obj or "method" in obj:
            return self._batch(line, custom_id, obj)
        if "messages" in obj and "prompt" in obj:
            raise FieldError("has both 'messages' and 'prompt'; keep one")
        if "messages" in obj:
            self._check_fields(obj, CHAT, "", line, plain=True)
            chat = fields.messages(obj["messages"], "messages")
            params = self._params(obj, "", CHAT)
            chat = tool_calls.with_tools(chat, tool_calls.spec_of(params.tools) if params.tools else None)
            return DatasetRow(line, custom_id, CHAT, messages=chat, params=params)
        if "prompt" in obj:
            self._check_fields(obj, COMPLETIONS, "", line, plain=True)
            text = fields.prompt(obj["prompt"], "prompt")
            return DatasetRow(line, custom_id, COMPLETIONS, prompt=text, params=self._params(obj, "", COMPLETIONS))
        keys = ", ".join(show(k, 30) for k in list(obj)[:6]) or "none"
        raise FieldError(
            "no 'messages', 'prompt' or 'body' — use --template or --field to build prompts from other fields"
            f" (keys: {keys})"
        )

    def _check_fields(self, src: dict[str, Any], endpoint: str, prefix: str, line: int, *, plain: bool) -> None:
        if self.line_model is not None:
            self.line_model.check(src, prefix)
        for key in contract.unknown_fields(src, endpoint, prefix, plain=plain):
            if self.ignored is None:
                raise contract.unknown_error(key, prefix)
            self.ignored.add(prefix + key, line)

    def _params(self, src: dict[str, Any], prefix: str, endpoint: str) -> SamplingParams:
        overrides = fields.sampling_overrides(src, prefix)
        extra = contract.extra_overrides(src, endpoint, prefix)
        overrides.update(extra)
        if endpoint == CHAT:
            overrides.update(tools_contract.tool_overrides(src, prefix, extra, flat=False))
        return self._params_of(overrides)

    def _params_of(self, overrides: dict[str, Any]) -> SamplingParams:
        """Rows of one file mostly set the same few parameters: build each distinct set once."""
        if not overrides:
            return self.defaults
        key = tuple(overrides.items())
        params = self._params_seen.get(key)
        if params is None:
            if len(self._params_seen) >= 4096:  # every row different (seeds): keep memory bounded
                self._params_seen.clear()
            params = self._params_seen[key] = replace(self.defaults, **overrides)
        return params

    def _from_data(self, line: int, custom_id: str, obj: dict[str, Any]) -> DatasetRow:
        values: dict[str, Any] = obj
        if self.text_field is not None:
            if self.text_field not in obj:
                raise FieldError("missing (chosen with --field)", self.text_field)
            text = fields.text_value(obj[self.text_field], self.text_field, allow_empty=False)
            values = {**obj, "text": text}
        content = self.template.render(values) if self.template is not None else values["text"]
        message = {"role": "user", "content": content}
        return DatasetRow(line, custom_id, CHAT, messages=(message,), params=self.defaults)

    def _batch(self, line: int, custom_id: str, obj: dict[str, Any]) -> DatasetRow:
        method = obj.get("method")
        if method is not None and method != "POST":
            raise FieldError(f"unsupported method {show(method)} (batch lines use POST)", "method")
        if "body" not in obj:
            raise FieldError("missing (batch lines need 'custom_id', 'method', 'url' and 'body')", "body")
        body = obj["body"]
        if not isinstance(body, dict):
            raise FieldError(f"must be an object, got {describe(body)}", "body")
        url = obj.get("url")
        if url is None:
            url = COMPLETIONS if "prompt" in body and "messages" not in body else CHAT
            url = EMBEDDINGS if "input" in body and not ("prompt" in body or "messages" in body) else url
        elif url not in (CHAT, COMPLETIONS, RESPONSES, EMBEDDINGS):
            served = f"tokenmill serves {CHAT}, {COMPLETIONS}, {RESPONSES} and {EMBEDDINGS}"
            raise FieldError(f"unsupported endpoint {show(url)} ({served})", "url")
        if url == EMBEDDINGS:
            if self.line_model is not None:  # one job, one model: embeddings lines name it too
                self.line_model.check(body, "body.")
            return DatasetRow(line, custom_id, EMBEDDINGS, **fields.embedding_request(body, "body."))
        if url == RESPONSES:
            self._check_fields(body, RESPONSES, "body.", line, plain=False)
            messages, overrides, echo = responses_contract.request(body, "body.")
            params = self._params_of(overrides)
            return DatasetRow(line, custom_id, RESPONSES, messages=messages, params=params, echo=echo)
        if url == CHAT:
            if "messages" not in body:
                raise FieldError(f"missing ({CHAT} needs messages)", "body.messages")
            self._check_fields(body, CHAT, "body.", line, plain=False)
            chat = fields.messages(body["messages"], "body.messages")
            params = self._params(body, "body.", CHAT)
            chat = tool_calls.with_tools(chat, tool_calls.spec_of(params.tools) if params.tools else None)
            return DatasetRow(line, custom_id, CHAT, messages=chat, params=params)
        if "prompt" not in body:
            raise FieldError(f"missing ({COMPLETIONS} needs a prompt)", "body.prompt")
        self._check_fields(body, COMPLETIONS, "body.", line, plain=False)
        text = fields.prompt(body["prompt"], "body.prompt")
        return DatasetRow(line, custom_id, COMPLETIONS, prompt=text, params=self._params(body, "body.", COMPLETIONS))



class _JobKind:
    """A job is generation or embeddings, never both: a worker's context serves one kind of request.

    The first row decides; each line of the other kind is a line error naming the line that decided.
    """

    def __init__(self) -> None:
        self.first: tuple[bool, int] | None = None  # (embeddings?, line) of the first row

    def check(self, row: DatasetRow) -> None:
        embeds = row.endpoint not in GENERATION_ENDPOINTS
        if self.first is None:
            self.first = (embeds, row.line)
            return
        first_embeds, first_line = self.first
        if embeds != first_embeds:
            this, that = ("an embeddings", "a generation") if embeds else ("a generation", "an embeddings")
            raise FieldError(
                f"is {this} request but line {first_line} made this {that} job; "
                "a job is either generation or embeddings, put them in separate files",
                "url",
            )
