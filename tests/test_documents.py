"""Document folders → rows: file selection, templates, splitting by token budget, and the folder boundary."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenmill import documents
from tokenmill.documents import (
    estimate_tokens,
    list_documents,
    load_template,
    read_document,
    read_documents,
    split_text,
)
from tokenmill.errors import DatasetError, UsageError
from tokenmill.rows import CHAT, SamplingParams


def words(text: str) -> int:
    return len(text.split())


def make(root: Path, files: dict[str, str | bytes]) -> Path:
    for rel, content in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
    return root


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    return make(
        tmp_path / "docs",
        {
            "b.md": "# B\n\nbee",
            "a.txt": "\ufeffalpha\r\nline two\r\n",
            "sub/c.TXT": "  sea  ",
            "sub/deep/d.md": "dee",
            "notes.csv": "x,y",
            "image.png": b"\x89PNG\x00",
            ".hidden.txt": "secret",
            ".git/e.txt": "internal",
            "sub/.cache/f.md": "cached",
        },
    )


def test_one_row_per_document_sorted_by_relative_path(docs: Path) -> None:
    defaults = SamplingParams(max_tokens=77)
    rows = list(read_documents(docs, "[{name}|{stem}] {text}", defaults=defaults))
    assert [r.custom_id for r in rows] == ["a.txt", "b.md", "sub/c.TXT", "sub/deep/d.md"]
    assert [r.source for r in rows] == [r.custom_id for r in rows]
    assert [r.line for r in rows] == [1, 2, 3, 4]
    assert all(r.endpoint == CHAT and r.params == defaults for r in rows)
    assert [r.messages for r in rows][:3] == [
        ({"role": "user", "content": "[a.txt|a] alpha\nline two"},),
        ({"role": "user", "content": "[b.md|b] # B\n\nbee"},),
        ({"role": "user", "content": "[sub/c.TXT|c] sea"},),
    ]


def test_list_documents_skips_hidden_and_other_files(docs: Path) -> None:
    assert [rel for rel, _ in list_documents(docs)] == ["a.txt", "b.md", "sub/c.TXT", "sub/deep/d.md"]


def test_long_document_is_split_into_parts_within_budget(tmp_path: Path) -> None:
    paragraphs = [" ".join(f"p{i}w{j}" for j in range(6)) for i in range(10)]
    folder = make(tmp_path / "docs", {"long.md": "\n\n".join(paragraphs), "short.txt": "tiny doc"})
    rows = list(read_documents(folder, "{part}/{parts} of {name}: {text}", token_budget=14, count_tokens=words))
    long_rows = [r for r in rows if r.source == "long.md"]
    assert [r.custom_id for r in long_rows] == [f"long.md#part-{k}" for k in range(1, 6)]
    texts = [r.messages[0]["content"].split(": ", 1)[1] for r in long_rows if r.messages]
    assert texts[0] == "\n\n".join(paragraphs[:2])  # two 6-word paragraphs fit 14, a third does not
    assert all(words(t) <= 14 for t in texts)
    assert " ".join(texts).split() == " ".join(paragraphs).split()
    assert long_rows[2].messages and long_rows[2].messages[0]["content"].startswith("3/5 of long.md: ")
    assert rows[-1].custom_id == "short.txt" and rows[-1].line == 6


def test_split_prefers_paragraphs_then_sentences_then_words() -> None:
    text = "One two. Three four five.\n\nSix."
    assert split_text(text, 5, words) == ["One two. Three four five.", "Six."]
    assert split_text(text, 3, words) == ["One two.", "Three four five.", "Six."]
    # A paragraph cut finer: its last piece starts the next part, which the next paragraph may join.
    assert split_text(text, 2, words) == ["One two.", "Three four", "five.\n\nSix."]


def test_split_cuts_a_single_overlong_word() -> None:
    assert split_text("x" * 10, 1, lambda s: len(s) // 4 + (len(s) % 4 > 0)) == ["xxxx", "xxxx", "xx"]


def test_split_of_text_without_whitespace_is_linear() -> None:
    """A 100 MB one-word file took minutes: every part re-counted (and copied) the whole rest."""
    examined = 0

    def counting(text: str) -> int:
        nonlocal examined
        examined += len(text)
        return estimate_tokens(text)

    text = "x" * 200_000
    parts = split_text(text, 100, counting)
    assert "".join(parts) == text and all(estimate_tokens(p) <= 100 for p in parts)
    assert examined < 64 * len(text), f"{examined / len(text):.0f} characters counted per character of text"


def test_split_keeps_within_budget_when_joiners_cost_tokens() -> None:
    def costly_newlines(text: str) -> int:
        return words(text) + 3 * text.count("\n")

    parts = split_text("a b\n\nc d\n\ne f", 5, costly_newlines)
    assert all(costly_newlines(p) <= 5 for p in parts)
    assert " ".join(parts).split() == list("abcdef")


@settings(max_examples=200, deadline=None, database=None)
@given(text=st.text(alphabet=st.sampled_from("ab .!?\n\t€"), max_size=400), budget=st.integers(1, 40))
def test_split_never_exceeds_budget_and_loses_nothing(text: str, budget: int) -> None:
    parts = split_text(text, budget)
    assert all(0 < estimate_tokens(p) <= budget for p in parts)
    assert "".join("".join(p.split()) for p in parts) == "".join(text.split())


def test_template_from_file(tmp_path: Path, docs: Path) -> None:
    template_file = tmp_path / "summarize.txt"
    template_file.write_bytes(b"\xef\xbb\xbfSummarize {name}:\r\n\r\n{text}\r\n")
    template = load_template(str(template_file))
    assert template == "Summarize {name}:\n\n{text}"
    first = next(read_documents(docs, template))
    assert first.messages == ({"role": "user", "content": "Summarize a.txt:\n\nalpha\nline two"},)


def test_load_template_text_and_bad_paths(tmp_path: Path) -> None:
    assert load_template("Summarize: {text}") == "Summarize: {text}"
    with pytest.raises(DatasetError, match="template file not found"):
        load_template(str(tmp_path / "prompt.txt"))
    with pytest.raises(DatasetError, match="is a directory"):
        load_template(str(tmp_path))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"R\xe9sum\xe9 {text}")
    with pytest.raises(DatasetError, match=r"latin1\.txt: template is not valid UTF-8"):
        load_template(str(bad))


def test_symlink_to_a_file_outside_the_folder_is_refused(tmp_path: Path, docs: Path) -> None:
    secret = make(tmp_path / "outside", {"secret.txt": "password"}) / "secret.txt"
    (docs / "sub" / "link.txt").symlink_to(secret)
    with pytest.raises(DatasetError) as exc:
        read_documents(docs, "{text}")
    assert str(exc.value) == f"{docs}/sub/link.txt: symlink points outside the document folder; refusing to follow it"


def test_symlink_to_a_folder_outside_is_refused(tmp_path: Path, docs: Path) -> None:
    outside = make(tmp_path / "outside", {"x.txt": "x"})
    (docs / "more").symlink_to(outside, target_is_directory=True)
    with pytest.raises(DatasetError, match="symlink points outside"):
        list_documents(docs)


def test_symlinks_inside_the_folder_are_allowed(docs: Path) -> None:
    (docs / "alias.txt").symlink_to(docs / "a.txt")
    (docs / "again").symlink_to(docs / "sub", target_is_directory=True)
    (docs / "sub" / "loop").symlink_to(docs, target_is_directory=True)
    assert [rel for rel, _ in list_documents(docs)] == ["a.txt", "alias.txt", "b.md", "sub/c.TXT", "sub/deep/d.md"]


def test_broken_symlink(docs: Path) -> None:
    (docs / "gone.txt").symlink_to(docs / "nothing.txt")
    with pytest.raises(DatasetError, match=r"gone\.txt: broken symlink"):
        list_documents(docs)


@pytest.mark.timeout(60)
def test_fifo_or_device_in_the_folder_is_a_clear_error_not_a_hang(docs: Path) -> None:
    """A FIFO with no writer blocks open() forever (and /dev/zero never ends) while submit holds the lock."""
    os.mkfifo(docs / "pipe.txt")
    with pytest.raises(DatasetError) as exc:
        list_documents(docs)
    assert str(exc.value) == f"{docs}/pipe.txt: not a regular file (a FIFO, socket or device); refusing to read it"
    (docs / "pipe.txt").unlink()
    os.mkfifo(docs / "sub" / ".pipe")
    (docs / "alias.md").symlink_to(docs / "sub" / ".pipe")
    with pytest.raises(DatasetError, match=r"alias\.md: not a regular file"):
        list_documents(docs)
    (docs / "alias.md").unlink()
    (docs / "zero.txt").symlink_to("/dev/zero")
    with pytest.raises(DatasetError, match=r"zero\.txt: symlink points outside"):
        list_documents(docs)


@pytest.mark.timeout(60)
def test_read_document_refuses_a_fifo_without_blocking(tmp_path: Path) -> None:
    """The file may be swapped for a FIFO between listing and reading: the read itself must not block."""
    os.mkfifo(tmp_path / "late.txt")
    with pytest.raises(DatasetError, match=r"late\.txt: not a regular file"):
        read_document(tmp_path / "late.txt")


def test_empty_missing_and_non_folder(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no documents \(\.md, \.txt\) in this folder"):
        read_documents(tmp_path / "empty", "{text}")
    make(tmp_path / "others", {"a.csv": "x", ".b.txt": "y"})
    with pytest.raises(DatasetError, match="no documents"):
        read_documents(tmp_path / "others", "{text}")
    with pytest.raises(DatasetError, match="folder not found"):
        read_documents(tmp_path / "nope", "{text}")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DatasetError, match="is not a folder"):
        read_documents(tmp_path / "file.txt", "{text}")


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b"caf\xe9", "bad.txt: not valid UTF-8: byte 0xe9 at offset 3"),
        (b" \n\r\n ", "bad.txt: document is empty"),
        (b"abc\x00def", "bad.txt: looks like a binary file, expected UTF-8 text"),
    ],
)
def test_unreadable_document_names_the_file(tmp_path: Path, content: bytes, fragment: str) -> None:
    folder = make(tmp_path / "docs", {"a.txt": "fine", "bad.txt": content})
    rows = read_documents(folder, "{text}")
    assert next(rows).custom_id == "a.txt"
    with pytest.raises(DatasetError) as exc:
        next(rows)
    assert str(exc.value).endswith(fragment) and str(folder) in str(exc.value)


@pytest.mark.parametrize(
    ("template", "budget", "fragment"),
    [
        ("{title}: {text}", None, "template field {title} is not available for documents"),
        ("About {name}", None, "must contain {text}"),
        ("{text.__class__}", None, "only top-level fields"),
        ("{text}", 0, "token budget must be at least 1"),
    ],
)
def test_bad_template_or_budget(docs: Path, template: str, budget: int | None, fragment: str) -> None:
    with pytest.raises(UsageError) as exc:
        read_documents(docs, template, token_budget=budget)
    assert fragment in str(exc.value)


def test_unreadable_file(docs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = docs / "a.txt"
    if os.geteuid() == 0:  # root reads a chmod-0 file, so make the read fail as it would for a user
        real = documents._read_regular

        def denied(path: Path) -> bytes | None:
            if path == target:
                raise PermissionError(13, "Permission denied", str(path))
            return real(path)

        monkeypatch.setattr(documents, "_read_regular", denied)
    else:
        target.chmod(0)
    with pytest.raises(DatasetError, match="cannot read: Permission denied"):
        list(read_documents(docs, "{text}"))


class FakeCounter:
    """A tokenizer whose counts are not additive (a join can merge or split tokens), with chat markup."""

    chat_overhead = 7

    def count(self, text: str) -> int:
        return len(text.encode()) // 3 + text.count(" ") // 2 + text.count("\n")


def test_exact_budget_keeps_every_prompt_within_the_context(tmp_path: Path) -> None:
    body = "\n\n".join(f"Section {i}. " + "Lorem ipsum dolor sit amet. " * (i + 3) for i in range(40))
    folder = make(tmp_path / "docs", {"long.md": body, "short.txt": "tiny"})
    counter = FakeCounter()
    budget = documents.PartBudget(n_ctx=300, max_tokens=40, counter=counter)
    rows = list(read_documents(folder, "Summarize part {part} of {parts} of {name}:\n{text}", budget=budget))
    long_rows = [r for r in rows if r.source == "long.md"]
    assert len(long_rows) > 5 and rows[-1].custom_id == "short.txt"
    for row in rows:
        assert row.messages is not None
        assert counter.chat_overhead + counter.count(row.messages[0]["content"]) + 40 <= 300
    texts = [r.messages[0]["content"].split(":\n", 1)[1] for r in long_rows if r.messages]
    assert "".join("".join(t.split()) for t in texts) == "".join(body.split())  # nothing lost or repeated


def test_overlap_repeats_the_end_of_each_part(tmp_path: Path) -> None:
    sentences = " ".join(f"Sentence number {i} ends here." for i in range(120))
    folder = make(tmp_path / "docs", {"a.txt": sentences})
    counter = FakeCounter()
    budget = documents.PartBudget(n_ctx=200, max_tokens=20, counter=counter, overlap=15)
    parts = [r.messages[0]["content"] for r in read_documents(folder, "{text}", budget=budget) if r.messages]
    assert len(parts) > 3
    for before, part in itertools.pairwise(parts):
        head = part.split("\n", 1)[0]
        assert before.endswith(head) and 0 < counter.count(head) <= 15
        assert counter.chat_overhead + counter.count(part) + 20 <= 200


@settings(max_examples=150, deadline=None, database=None)
@given(
    text=st.text(alphabet=st.sampled_from("ab .!?\n\t€字"), min_size=1, max_size=600),
    n_ctx=st.integers(120, 400),
    overlap=st.integers(0, 20),
    fixed=st.sampled_from(["{text}", "Part {part}/{parts} of {name}: {text} — be brief."]),
)
def test_exact_budget_never_exceeds_the_context(text: str, n_ctx: int, overlap: int, fixed: str) -> None:
    """Whatever the text, template and overlap, no rendered part with its markup and answer overflows."""
    if not text.strip():
        return
    counter = FakeCounter()
    budget = documents.PartBudget(n_ctx=n_ctx, max_tokens=30, counter=counter, overlap=overlap)
    template = documents.compile_template(fixed)
    parts = documents.split_document(text.strip(), "d.txt", template, budget)
    for k, part in enumerate(parts, 1):
        prompt = template.render({"text": part, "name": "d.txt", "stem": "d", "part": k, "parts": len(parts)})
        assert counter.chat_overhead + counter.count(prompt) + 30 <= n_ctx
    if overlap == 0:
        assert "".join("".join(p.split()) for p in parts) == "".join(text.split())


def test_no_room_for_text_is_a_usage_error(docs: Path) -> None:
    budget = documents.PartBudget(n_ctx=100, max_tokens=90, counter=FakeCounter())
    with pytest.raises(UsageError, match="leave no room for document text in a 100-token context"):
        read_documents(docs, "{text}", budget=budget)
