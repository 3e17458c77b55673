"""``/v1/files`` over real HTTP: a download never ends in a short body under a full ``Content-Length``."""

from __future__ import annotations

import http.client
import json

from sqlalchemy import delete

from tests.conftest import API_KEYS, InProcessServer
from tests.server.helpers import client, upload
from tokenmill.store.tables import ApiFileChunk


def _get(server: InProcessServer, path: str) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {API_KEYS[0]}"})
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


def test_a_damaged_file_is_an_error_not_a_truncated_download(api_app: InProcessServer) -> None:
    c = client(api_app.url + "/v1", API_KEYS[0])
    data = (b'{"x": "' + b"y" * 2990 + b'"}\n') * 900  # 2.7 MB in 900 lines: three chunks
    file_id = upload(c, data)
    status, headers, body = _get(api_app, f"/v1/files/{file_id}/content")
    assert status == 200 and body == data and headers["content-length"] == str(len(data))
    with api_app.store.session() as s:  # a chunk lost under the file (a partial restore, a bad disk)
        s.execute(delete(ApiFileChunk).where(ApiFileChunk.file_id == file_id, ApiFileChunk.idx == 1))
    status, headers, body = _get(api_app, f"/v1/files/{file_id}/content")
    assert status == 500
    error = json.loads(body)["error"]
    assert error["code"] == "file_damaged" and file_id in error["message"]
