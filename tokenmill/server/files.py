"""``/v1/files``: upload (streamed into the store in chunks), list, retrieve, raw content, delete."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import StreamingResponse

from tokenmill.errors import FileUnreadable
from tokenmill.server.auth import tenant
from tokenmill.server.errors import ApiError, not_found
from tokenmill.server.schemas import FileDeleted, FileList, FileObject
from tokenmill.store import Store
from tokenmill.store import files as store_files

router = APIRouter(prefix="/v1/files", tags=["files"])
Tenant = Annotated[str, Depends(tenant)]


def _store(request: Request) -> Store:
    store: Store = request.app.state.store
    return store


@router.post("", response_model=FileObject)
def upload(
    request: Request,
    owner: Tenant,
    file: Annotated[UploadFile, File()],
    purpose: Annotated[str, Form()],
) -> FileObject:
    """The multipart body is already spooled to a temporary file by the parser (the gate capped it as it
    streamed: tokenmill.server.gate); it is copied on in 1 MiB chunks, one short transaction each
    (store/files.py)."""
    if purpose != "batch":
        raise ApiError(400, f"purpose {purpose!r} is not supported (tokenmill serves 'batch')", param="purpose")
    settings = request.app.state.settings
    try:
        f = store_files.create_file(
            _store(request),
            owner=owner,
            filename=(file.filename or "upload.jsonl")[:512],
            purpose=purpose,
            source=file.file,
            max_bytes=settings.file_max_bytes,
            max_lines=settings.file_max_lines,
        )
        return FileObject.of(f)
    except store_files.FileTooLarge as exc:
        if exc.what == "bytes":
            raise ApiError(413, f"file is larger than {exc.limit} bytes", param="file", code="file_too_large") from None
        raise ApiError(400, f"file has more than {exc.limit} lines", param="file", code="too_many_lines") from None


@router.get("", response_model=FileList)
def list_files(
    request: Request,
    owner: Tenant,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10000)] = 10000,
    purpose: Annotated[str | None, Query(max_length=32)] = None,
) -> FileList:
    with _store(request).session() as s:
        page, more = store_files.list_files(s, owner, limit=limit, after=after, purpose=purpose)
        data = [FileObject.of(f) for f in page]
    return FileList(
        data=data, has_more=more, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
    )


@router.get("/{file_id}", response_model=FileObject)
def retrieve(request: Request, owner: Tenant, file_id: str) -> FileObject:
    with _store(request).session() as s:
        f = store_files.get_file(s, file_id, owner)
        if f is None:
            raise not_found("file", file_id)
        return FileObject.of(f)


@router.get("/{file_id}/content", response_class=StreamingResponse)
def content(request: Request, owner: Tenant, file_id: str) -> StreamingResponse:
    """The stored chunks are checked against the file's size before ``Content-Length`` promises it; a file
    deleted while it streams ends the connection with an error, never with a short body that looks whole."""
    store = _store(request)
    with store.session() as s:
        f = store_files.get_file(s, file_id, owner)
        if f is None:
            raise not_found("file", file_id)
        try:
            store_files.check_complete(s, f)
        except FileUnreadable as exc:
            raise ApiError(500, str(exc), param="file_id", code="file_damaged") from None
        size = f.bytes
    return StreamingResponse(
        store_files.stream(store, file_id),
        media_type="application/octet-stream",
        headers={"Content-Length": str(size)},
    )


@router.delete("/{file_id}", response_model=FileDeleted)
def delete(request: Request, owner: Tenant, file_id: str) -> FileDeleted:
    with _store(request).session() as s:
        if store_files.get_file(s, file_id, owner) is None:
            raise not_found("file", file_id)
        store_files.delete_file(s, file_id)
    return FileDeleted(id=file_id, deleted=True)
