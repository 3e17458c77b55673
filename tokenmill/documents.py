"""Document workflows: a folder of ``.txt``/``.md`` files becomes dataset rows through a prompt template.

One row per document, or per part when a document does not fit one request, so an overnight run over a
folder of reports yields exactly one result (or one error) per file or part. Parts are budgeted with the
model's own tokenizer (:class:`PartBudget`): the chat markup, the rendered template, the part and the
answer's ``max_tokens`` together fit the per-request context, so no part fails with
context_length_exceeded; cuts fall on paragraph, then line, sentence and word boundaries, and an optional
overlap repeats the end of each part at the start of the next. The folder is listed
and every symlink checked before the first row is produced; a symlink that leads outside the folder is
refused, because a dataset must not become a way to read files its author could not put there.
"""

from __future__ import annotations

import itertools
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Protocol

from tokenmill.dataset_fields import MAX_ID_LENGTH, FieldError, Template, compile_template
from tokenmill.errors import DatasetError, UsageError
from tokenmill.rows import CHAT, DatasetRow, SamplingParams

DOCUMENT_SUFFIXES = frozenset({".txt", ".md"})
DOCUMENT_FIELDS = ("text", "name", "stem", "part", "parts")
_TEMPLATE_SUFFIXES = frozenset({".txt", ".md", ".tmpl", ".template", ".prompt"})
_SNIFF_BYTES = 8192
_NOT_REGULAR = "not a regular file (a FIFO, socket or device); refusing to read it"

CountTokens = Callable[[str], int]
MIN_PART_TOKENS = 32  # below this, the template and max_tokens leave no real room for document text
_SLACK = 4  # tokens for merges where the part meets the template's words, and wider part numbers


class TokenCounter(Protocol):
    """A model's tokenizer as the splitter needs it (:class:`tokenmill.models.tokenizer.Tokenizer`)."""

    chat_overhead: int  # tokens the chat template adds around one user message

    def count(self, text: str) -> int: ...


@dataclass(frozen=True)
class PartBudget:
    """What one row of a document may hold: ``n_ctx`` tokens per request for the chat markup, the rendered
    template with its part, and ``max_tokens`` of answer. ``text_tokens`` caps the document text of a part
    below that (``--token-budget``); ``overlap`` tokens of a part's end are repeated at the next one's start."""

    n_ctx: int
    max_tokens: int
    counter: TokenCounter
    text_tokens: int | None = None
    overlap: int = 0

    @property
    def prompt_limit(self) -> int:
        """Tokens the rendered prompt (the message content) may have."""
        return self.n_ctx - self.max_tokens - self.counter.chat_overhead

    def fits(self, prompt: str) -> bool:
        return self.counter.count(prompt) <= self.prompt_limit

_LEVELS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\n[ \t]*\n\s*"), "\n\n"),  # paragraphs
    (re.compile(r"\n"), "\n"),  # lines (lists, tables)
    (re.compile("(?<=[.!?\u2026\u3002\uff01\uff1f])\\s+"), " "),  # sentences, incl. CJK
    (re.compile(r"\s+"), " "),  # words
)


def estimate_tokens(text: str) -> int:
    """About four characters per token: close enough to budget parts without loading a tokenizer."""
    return (len(text) + 3) // 4


def load_template(arg: str) -> str:
    """``--template`` takes the template itself or a file holding it; an existing file wins."""
    path = Path(arg)
    try:
        is_file, is_dir = path.is_file(), path.is_dir()
    except (OSError, ValueError):
        is_file = is_dir = False
    if is_dir:
        raise DatasetError(arg, "is a directory, expected a template file or template text")
    if not is_file:
        if "{" not in arg and path.suffix.lower() in _TEMPLATE_SUFFIXES:
            raise DatasetError(arg, "template file not found")
        return arg
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(arg, f"cannot read template: {exc.strerror or type(exc).__name__}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(arg, f"template is not valid UTF-8 (byte offset {exc.start})") from None
    return text.replace("\r\n", "\n").rstrip("\n")


def read_documents(
    folder: Path,
    template: str,
    *,
    token_budget: int | None = None,
    count_tokens: CountTokens | None = None,
    defaults: SamplingParams | None = None,
    budget: PartBudget | None = None,
) -> Iterator[DatasetRow]:
    """Yield one chat row per document (or document part), in sorted relative-path order.

    Template, budget and folder problems raise at call time; a document that cannot be read or decoded
    raises :class:`DatasetError` naming it when its turn comes. Template fields: ``{text}`` (the document
    or part), ``{name}`` (relative POSIX path), ``{stem}``, ``{part}`` and ``{parts}`` (1 and 1 when not
    split). ``DatasetRow.line`` is the row's 1-based position, since documents have no lines.

    With ``budget``, parts are cut by the model's token counts so every row fits the context; without it,
    by ``token_budget`` tokens of ``count_tokens`` (about four characters each by default).
    """
    compiled = compile_template(template)
    unknown = [name for name in compiled.fields if name not in DOCUMENT_FIELDS]
    if unknown:
        allowed = ", ".join("{" + name + "}" for name in DOCUMENT_FIELDS)
        raise UsageError(f"template field {{{unknown[0]}}} is not available for documents (use {allowed})")
    if "text" not in compiled.fields:
        raise UsageError("a document template must contain {text}")
    if token_budget is not None and token_budget < 1:
        raise UsageError(f"token budget must be at least 1, got {token_budget}")
    files = list_documents(Path(folder))
    params = defaults or SamplingParams()
    if budget is not None:
        _check_room(compiled, budget)
        return _rows(files, compiled, lambda text, rel: split_document(text, rel, compiled, budget), params)
    count = count_tokens or estimate_tokens

    def cut(text: str, rel: str) -> list[str]:
        return split_text(text, token_budget, count) if token_budget is not None else [text]

    return _rows(files, compiled, cut, params)


def longest_prompt(folder: Path, template: str, counter: TokenCounter) -> tuple[int, str]:
    """(tokens, relative path) of the longest document's whole prompt, chat markup included: the context
    a request would need to take every document whole."""
    compiled = compile_template(template)
    best, name = 0, ""
    for rel, path in list_documents(Path(folder)):
        text = read_document(path)
        try:
            fixed = counter.count(compiled.render(_values(rel, "", 1, 1)))
        except FieldError as exc:
            raise DatasetError(str(path), exc.message, field=exc.field) from None
        tokens = counter.chat_overhead + fixed + counter.count(text)
        if tokens > best:
            best, name = tokens, rel
    return best, name


def list_documents(folder: Path) -> list[tuple[str, Path]]:
    """``(relative POSIX path, path)`` of every document, sorted; hidden files and folders are skipped.

    A symlinked folder inside the tree is not descended (its files are listed where they really are,
    and a link cycle cannot loop); one that points outside is refused like an outside file link.
    """
    name = str(folder)
    if not folder.exists():
        raise DatasetError(name, "folder not found")
    if not folder.is_dir():
        raise DatasetError(name, "is not a folder")
    root = folder.resolve()
    found: list[tuple[str, Path]] = []

    def refuse(exc: OSError) -> None:
        raise DatasetError(str(exc.filename or name), f"cannot list: {exc.strerror or type(exc).__name__}")

    for dirpath, dirnames, filenames in os.walk(folder, onerror=refuse):
        here = Path(dirpath)
        kept = []
        for sub in dirnames:
            if sub.startswith("."):
                continue
            if (here / sub).is_symlink():
                _check_link(here / sub, root)
                continue
            kept.append(sub)
        dirnames[:] = sorted(kept)
        for file in filenames:
            path = here / file
            if file.startswith(".") or path.suffix.lower() not in DOCUMENT_SUFFIXES:
                continue
            if path.is_symlink():
                _check_link(path, root)
            if not path.is_file():
                raise DatasetError(str(path), _NOT_REGULAR)
            found.append((_relative(path, folder), path))
    if not found:
        raise DatasetError(name, f"no documents ({', '.join(sorted(DOCUMENT_SUFFIXES))}) in this folder")
    return sorted(found)


def _check_link(link: Path, root: Path) -> None:
    target = link.resolve()
    if not target.is_relative_to(root):
        raise DatasetError(str(link), "symlink points outside the document folder; refusing to follow it")
    if not target.exists():
        raise DatasetError(str(link), "broken symlink")


def _relative(path: Path, folder: Path) -> str:
    rel = path.relative_to(folder).as_posix()
    try:
        rel.encode("utf-8")
    except UnicodeEncodeError:
        shown = str(path).encode("utf-8", "backslashreplace").decode()
        raise DatasetError(shown, "file name is not valid UTF-8") from None
    if any(ord(c) < 32 or c == "\x7f" for c in rel):
        raise DatasetError(repr(str(path))[1:-1], "file name contains control characters (newline, tab)")
    return rel


def read_document(path: Path) -> str:
    """The document as text with newlines normalized; empty, binary or non-UTF-8 files are errors."""
    name = str(path)
    try:
        data = _read_regular(path)
    except OSError as exc:
        raise DatasetError(name, f"cannot read: {exc.strerror or type(exc).__name__}") from None
    if data is None:
        raise DatasetError(name, _NOT_REGULAR)
    if b"\x00" in data[:_SNIFF_BYTES]:
        raise DatasetError(name, "looks like a binary file, expected UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        bad = data[exc.start]
        raise DatasetError(name, f"not valid UTF-8: byte 0x{bad:02x} at offset {exc.start}") from None
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        raise DatasetError(name, "document is empty")
    return text


def _read_regular(path: Path) -> bytes | None:
    """The file's bytes, or None for anything but a regular file.

    Opened non-blocking and checked on the open descriptor, so a FIFO swapped in after listing neither
    blocks the open (no writer) nor streams forever (``/dev/zero``).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return fh.read()


def split_text(text: str, token_budget: int, count_tokens: CountTokens = estimate_tokens) -> list[str]:
    """Cut text into parts of at most ``token_budget`` tokens, at the coarsest boundary that fits.

    Paragraphs first, then lines, sentences, words; only a single word longer than the budget is cut
    mid-word. Each piece is counted once and groups are re-counted, so a tokenizer whose counts are not
    additive still never yields an over-budget part.
    """
    if token_budget < 1:
        raise ValueError("token_budget must be at least 1")
    text = text.strip()
    return _split(text, token_budget, count_tokens, 0) if text else []


def _split(text: str, budget: int, count: CountTokens, level: int) -> list[str]:
    if count(text) <= budget:
        return [text]
    if level == len(_LEVELS):
        return _hard_split(text, budget, count)
    pattern, joiner = _LEVELS[level]
    pieces = [piece for piece in (raw.strip() for raw in pattern.split(text)) if piece]
    if len(pieces) <= 1:
        return _split(text, budget, count, level + 1)
    join_cost = count(joiner)
    parts: list[str] = []
    group: list[str] = []
    used = 0
    for piece in pieces:
        size = count(piece)
        if size > budget:
            # Cut the piece finer; its first part may join the part before and its last starts the next
            # group, so the parts around a long paragraph are filled instead of left half empty.
            sub = _split(piece, budget, count, level + 1)
            while group:
                group = _take(group, joiner, budget, count, parts)
            if parts and count(merged := parts[-1] + joiner + sub[0]) <= budget:
                parts[-1] = merged
            else:
                parts.append(sub[0])
            parts.extend(sub[1:-1])
            group = sub[-1:] if len(sub) > 1 else []
            used = count(group[0]) if group else 0
            continue
        while group and used + join_cost + size > budget:
            group = _take(group, joiner, budget, count, parts)
            used = sum(count(g) for g in group) + join_cost * max(0, len(group) - 1)
        group.append(piece)
        used += size + (join_cost if len(group) > 1 else 0)
    while group:
        group = _take(group, joiner, budget, count, parts)
    return parts


def _take(group: list[str], joiner: str, budget: int, count: CountTokens, parts: list[str]) -> list[str]:
    """Append the longest run of the group's first pieces that fits, joined, as a part; return the rest.

    Sizes are summed as pieces are grouped, but a tokenizer's count of the joined text can differ from
    the sum (joiners cost tokens, and tokens merge across joins), so the joined text is counted here.
    """
    low, high = 1, len(group)  # one piece alone always fits: pieces over the budget are cut finer first
    while low < high:
        mid = (low + high + 1) // 2
        if count(joiner.join(group[:mid])) <= budget:
            low = mid
        else:
            high = mid - 1
    parts.append(joiner.join(group[:low]))
    return group[low:]


def _hard_split(text: str, budget: int, count: CountTokens) -> list[str]:
    """Cut a text with no boundary left into the longest prefixes that fit, in time linear in its length.

    Only the part being measured is ever counted or copied: re-counting (and slicing off) the whole
    rest for every part made a 100 MB one-word file take minutes.
    """
    parts: list[str] = []
    cap = budget * 64  # no part is longer than this many characters
    start, end = 0, len(text)
    while start < end:
        if end - start <= cap and count(text[start:]) <= budget:
            parts.append(text[start:])
            break
        take = _longest_fit(text, start, min(end - start, cap), budget, count)
        parts.append(text[start : start + take])
        start += take
    return parts


def _longest_fit(text: str, start: int, limit: int, budget: int, count: CountTokens) -> int:
    """Characters from ``start`` (1..limit) whose count fits: gallop from an estimate, then bisect."""
    low, probe = 1, min(limit, max(1, budget * 4))
    while count(text[start : start + probe]) <= budget:
        low = probe
        if probe == limit:
            return limit
        probe = min(limit, probe * 2)
    high = probe - 1  # the probe itself did not fit
    while low < high:
        mid = (low + high + 1) // 2
        if count(text[start : start + mid]) <= budget:
            low = mid
        else:
            high = mid - 1
    return low


def _values(rel: str, text: str, part: int, parts: int) -> dict[str, str | int]:
    return {"text": text, "name": rel, "stem": PurePosixPath(rel).stem, "part": part, "parts": parts}


def _check_room(template: Template, budget: PartBudget) -> None:
    """The template and the answer alone must leave room for some document text in each request."""
    try:
        fixed = budget.counter.count(template.render(_values("document.txt", "", 99999, 99999)))
    except FieldError as exc:
        raise UsageError(f"template: {exc.message}") from None
    if budget.prompt_limit - fixed - budget.overlap < MIN_PART_TOKENS:
        raise UsageError(
            f"the template ({fixed} tokens with its chat markup of {budget.counter.chat_overhead}) and max_tokens "
            f"{budget.max_tokens}{f' and an overlap of {budget.overlap}' if budget.overlap else ''} leave no room "
            f"for document text in a {budget.n_ctx}-token context; raise --n-ctx or lower --max-tokens"
        )


def split_document(text: str, rel: str, template: Template, budget: PartBudget) -> list[str]:
    """The parts of one document whose rendered prompts all fit ``budget`` (module doc).

    The text is cut to a budget derived from the template's own size, then every rendered part is
    counted as it will be sent; in the rare case the joins or the part numbers cost more than allowed,
    the budget shrinks by the excess and the document is cut again, so no part can exceed the context.
    """
    count = budget.counter.count
    if budget.fits(template.render(_values(rel, text, 1, 1))) and (
        budget.text_tokens is None or count(text) <= budget.text_tokens
    ):
        return [text]
    fixed = count(template.render(_values(rel, "", 99999, 99999)))
    room = budget.prompt_limit - fixed - _SLACK
    if budget.text_tokens is not None:
        room = min(room, budget.text_tokens)
    step = room - budget.overlap
    while True:
        if step < MIN_PART_TOKENS // 2:
            raise UsageError(f"{rel}: cannot cut this document into parts that fit a {budget.n_ctx}-token context")
        parts = with_overlap(split_text(text, step, count), budget.overlap, count)
        n = len(parts)
        over = max(count(template.render(_values(rel, p, k, n))) - budget.prompt_limit for k, p in enumerate(parts, 1))
        if budget.text_tokens is not None:
            over = max(over, *(count(p) - budget.text_tokens for p in parts))
        if over <= 0:
            return parts
        step -= max(over, 1)


def with_overlap(parts: list[str], overlap: int, count: CountTokens) -> list[str]:
    """Each part after the first begins with the last (at most) ``overlap`` tokens of the one before,
    cut at a word boundary, so a sentence split between two parts is read whole by one of them."""
    if overlap <= 0 or len(parts) < 2:
        return parts
    out = [parts[0]]
    for before, part in itertools.pairwise(parts):
        tail = _tail(before, overlap, count)
        out.append(f"{tail}\n{part}" if tail else part)
    return out


def _tail(text: str, tokens: int, count: CountTokens) -> str:
    """The longest suffix of ``text`` that starts at a word and has at most ``tokens`` tokens."""
    window = text[-tokens * 16 :]  # no token is longer than this on average: a bound, not a guess at the answer
    starts = [0] if len(window) == len(text) else []
    starts += [m.end() for m in re.finditer(r"\s+", window) if m.end() < len(window)]
    lo, hi = 0, len(starts)  # find the first start whose suffix fits; suffixes shrink as starts grow
    while lo < hi:
        mid = (lo + hi) // 2
        if count(window[starts[mid] :]) <= tokens:
            hi = mid
        else:
            lo = mid + 1
    return window[starts[lo] :] if lo < len(starts) else ""


def _rows(
    files: list[tuple[str, Path]],
    template: Template,
    cut: Callable[[str, str], list[str]],
    params: SamplingParams,
) -> Iterator[DatasetRow]:
    seq = 0
    for rel, path in files:
        text = read_document(path)
        parts = cut(text, rel)
        for k, part in enumerate(parts, 1):
            seq += 1
            custom_id = rel if len(parts) == 1 else f"{rel}#part-{k}"
            if len(custom_id) > MAX_ID_LENGTH:
                raise DatasetError(str(path), f"relative path too long for a row id (over {MAX_ID_LENGTH})")
            try:
                prompt = template.render(_values(rel, part, k, len(parts)))
            except FieldError as exc:
                raise DatasetError(str(path), exc.message, field=exc.field) from None
            message = {"role": "user", "content": prompt}
            yield DatasetRow(seq, custom_id, CHAT, messages=(message,), params=params, source=rel)
