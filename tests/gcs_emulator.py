"""A small Google Cloud Storage server for tests: the part of the GCS JSON API that a gs:// workdir
uses, over HTTP on localhost, objects kept in memory.

Served (https://cloud.google.com/storage/docs/json_api): object metadata, media download (with
Range), listing (prefix, delimiter, startOffset, endOffset, pages), delete, rewrite (copy), moveTo,
uploads (uploadType=media, multipart and resumable), batch deletes, bucket metadata. Objects have
generations, and the preconditions ifGenerationMatch / ifGenerationNotMatch answer 412 / 304 as GCS
does, because TensorStore's OCDBT checkpoints commit their manifests by conditional writes.

The clients are the real ones, pointed here by environment variables (`environ`): gcsfs (and
google-cloud-storage) by STORAGE_EMULATOR_HOST, TensorStore's `gcs` driver by TENSORSTORE_GCS_HTTP_URL
(with GOOGLE_AUTH_TOKEN_FOR_TESTING so that it looks for no credentials). Anything else answers 501
naming the request, so a client that needs more shows up as a failing test, not as silent success.
"""

from __future__ import annotations

import base64
import datetime
import email.utils
import hashlib
import http.server
import json
import re
import sys
import threading
import urllib.parse
import uuid

try:
    import google_crc32c
except ImportError:    # the checksum field is then left out
    google_crc32c = None


class _Error(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


class _Object:
    def __init__(self, bucket: str, name: str, data: bytes, generation: int, content_type: str, metadata):
        self.bucket, self.name, self.data, self.generation = bucket, name, data, generation
        self.content_type, self.metadata = content_type or "application/octet-stream", metadata or {}
        self.updated = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")

    def resource(self) -> dict:
        out = {"kind": "storage#object", "id": f"{self.bucket}/{self.name}/{self.generation}",
               "name": self.name, "bucket": self.bucket, "generation": str(self.generation),
               "metageneration": "1", "contentType": self.content_type, "size": str(len(self.data)),
               "md5Hash": base64.b64encode(hashlib.md5(self.data).digest()).decode(),
               "timeCreated": self.updated, "updated": self.updated, "storageClass": "STANDARD",
               "etag": f"{self.generation:x}"}
        if google_crc32c is not None:
            out["crc32c"] = base64.b64encode(google_crc32c.value(self.data).to_bytes(4, "big")).decode()
        if self.metadata:
            out["metadata"] = self.metadata
        return out


class GcsEmulator:
    """`with GcsEmulator(["bucket"]) as gcs:` serves at gcs.url; gcs.environ() points the clients there."""

    def __init__(self, buckets=("bucket",)):
        self.buckets: dict[str, dict[str, _Object]] = {b: {} for b in buckets}
        self.lock = threading.Lock()
        self._generation = 1_700_000_000_000_000
        self._uploads: dict[str, dict] = {}
        self.requests: list[tuple[str, str]] = []     # (method, path), for tests that want to see them
        emulator = self

        class Handler(_Handler):
            store = emulator

        self.server = _Server(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def environ(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "TENSORSTORE_GCS_HTTP_URL": self.url,
                "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator"}

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    # -- the store (callers hold self.lock) --------------------------------------------------------

    def _bucket(self, name: str) -> dict[str, _Object]:
        if name not in self.buckets:
            raise _Error(404, f"bucket {name} not found")
        return self.buckets[name]

    def _get(self, bucket: str, name: str) -> _Object:
        obj = self._bucket(bucket).get(name)
        if obj is None:
            raise _Error(404, f"no such object: {bucket}/{name}")
        return obj

    @staticmethod
    def _check(obj: _Object | None, query: dict, *, reading: bool = False) -> None:
        generation = 0 if obj is None else obj.generation
        if "ifGenerationMatch" in query and int(query["ifGenerationMatch"]) != generation:
            raise _Error(412, f"precondition failed: generation is {generation}")
        if "ifGenerationNotMatch" in query and int(query["ifGenerationNotMatch"]) == generation:
            raise _Error(304 if reading else 412, "not modified")

    def put(self, bucket: str, name: str, data: bytes, query: dict, content_type=None, metadata=None) -> _Object:
        objects = self._bucket(bucket)
        self._check(objects.get(name), query)
        self._generation += 1
        objects[name] = _Object(bucket, name, bytes(data), self._generation, content_type, metadata)
        return objects[name]

    def delete(self, bucket: str, name: str, query: dict) -> None:
        obj = self._get(bucket, name)
        self._check(obj, query)
        del self.buckets[bucket][name]


class _Server(http.server.ThreadingHTTPServer):
    def handle_error(self, request, client_address):
        # gcsfs asks for an object and its listing at once and drops the connection of the slower
        # answer: a client hanging up is not an error of the server.
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    store: GcsEmulator

    def log_message(self, *args):   # quiet
        pass

    # -- plumbing -----------------------------------------------------------------------------------

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/json", headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if status not in (204, 304):
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
        else:
            body = b""
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, obj, status: int = 200, headers=None):
        self._send(status, json.dumps(obj).encode(), headers=headers)

    def _dispatch(self):
        parts = urllib.parse.urlsplit(self.path)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        body = self._body()
        self.store.requests.append((self.command, parts.path))
        try:
            with self.store.lock:
                self._route(self.command, parts.path, query, body)
        except _Error as e:
            if e.status == 304:
                self._send(304)
            else:
                self._json({"error": {"code": e.status, "message": e.message}}, e.status)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _dispatch

    # -- the API ------------------------------------------------------------------------------------

    def _route(self, method: str, path: str, query: dict, body: bytes) -> None:
        path = re.sub(r"^/download(?=/storage/v1/)", "", path)   # gcsfs downloads through /download/...
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)/rewriteTo/b/([^/]+)/o/(.+)", path):
            return self._rewrite(*(urllib.parse.unquote(g) for g in m.groups()), query)
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)/moveTo/o/(.+)", path):
            bucket, name, name2 = (urllib.parse.unquote(g) for g in m.groups())
            src = self.store._get(bucket, name)
            obj = self.store.put(bucket, name2, src.data, query, src.content_type, src.metadata)
            del self.store.buckets[bucket][name]
            return self._json(obj.resource())
        if m := re.fullmatch(r"/storage/v1/b/([^/]+)/o/(.+)", path):
            bucket, name = (urllib.parse.unquote(g) for g in m.groups())
            if method in ("GET", "HEAD"):
                return self._read(bucket, name, query)
            if method == "DELETE":
                self.store.delete(bucket, name, query)
                return self._send(204)
        if (m := re.fullmatch(r"/storage/v1/b/([^/]+)/o", path)) and method == "GET":
            return self._list(urllib.parse.unquote(m[1]), query)
        if (m := re.fullmatch(r"/storage/v1/b/([^/]+)", path)) and method == "GET":
            self.store._bucket(m[1])
            return self._json({"kind": "storage#bucket", "id": m[1], "name": m[1], "location": "US",
                               "storageClass": "STANDARD", "metageneration": "1", "projectNumber": "0"})
        if m := re.fullmatch(r"/upload/storage/v1/b/([^/]+)/o", path):
            return self._upload(method, urllib.parse.unquote(m[1]), query, body)
        if path == "/batch/storage/v1" and method == "POST":
            return self._batch(body)
        raise _Error(501, f"gcs_emulator does not serve {method} {path}")

    def _read(self, bucket: str, name: str, query: dict) -> None:
        obj = self.store._get(bucket, name)
        self.store._check(obj, query, reading=True)
        if query.get("alt") != "media":
            return self._json(obj.resource())
        headers = {"x-goog-generation": str(obj.generation), "x-goog-metageneration": "1",
                   "x-goog-stored-content-length": str(len(obj.data)), "ETag": f'"{obj.generation:x}"',
                   "Last-Modified": email.utils.formatdate(usegmt=True)}
        data, status = obj.data, 200
        if (rng := self.headers.get("Range")) and data:
            m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
            if not m:
                raise _Error(400, f"unsupported Range {rng}")
            size = len(data)
            if m[1] == "":                           # the last n bytes
                start, end = max(0, size - int(m[2])), size - 1
            else:
                start, end = int(m[1]), min(size - 1, int(m[2])) if m[2] else size - 1
            if start >= size:
                headers["Content-Range"] = f"bytes */{size}"
                return self._send(416, b"", headers=headers)
            data, status = data[start:end + 1], 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        self._send(status, data, obj.content_type, headers)

    def _list(self, bucket: str, query: dict) -> None:
        objects = self.store._bucket(bucket)
        prefix, delimiter = query.get("prefix", ""), query.get("delimiter", "")
        start, end = query.get("startOffset"), query.get("endOffset")
        entries = {}          # name or prefix -> object (None for a prefix), in name order
        for name in sorted(objects):
            if not name.startswith(prefix) or (start and name < start) or (end and name >= end):
                continue
            rest = name[len(prefix):]
            if delimiter and delimiter in rest:
                entries.setdefault(prefix + rest[:rest.index(delimiter) + len(delimiter)], None)
            else:
                entries[name] = objects[name]
        first = int(query.get("pageToken") or 0)
        page = list(entries.items())[first:first + int(query.get("maxResults") or 1000)]
        out = {"kind": "storage#objects", "items": [o.resource() for _, o in page if o is not None]}
        if delimiter:
            out["prefixes"] = [p for p, o in page if o is None]
        if first + len(page) < len(entries):
            out["nextPageToken"] = str(first + len(page))
        self._json(out)

    def _rewrite(self, bucket: str, name: str, bucket2: str, name2: str, query: dict) -> None:
        src = self.store._get(bucket, name)
        obj = self.store.put(bucket2, name2, src.data, query, src.content_type, src.metadata)
        self._json({"kind": "storage#rewriteResponse", "done": True, "totalBytesRewritten": str(len(src.data)),
                    "objectSize": str(len(src.data)), "resource": obj.resource()})

    def _upload(self, method: str, bucket: str, query: dict, body: bytes) -> None:
        kind = query.get("uploadType")
        if kind == "media" and method == "POST":
            obj = self.store.put(bucket, query["name"], body, query, self.headers.get("Content-Type"))
            return self._json(obj.resource())
        if kind == "multipart" and method == "POST":
            meta, data = _multipart(self.headers.get("Content-Type", ""), body)
            obj = self.store.put(bucket, meta.get("name") or query["name"], data, query,
                                 meta.get("contentType"), meta.get("metadata"))
            return self._json(obj.resource())
        if kind == "resumable" and method == "POST" and "upload_id" not in query:
            meta = json.loads(body or b"{}")
            upload_id = uuid.uuid4().hex
            self.store._bucket(bucket)
            self.store._uploads[upload_id] = {
                "bucket": bucket, "name": meta.get("name") or query.get("name"), "data": b"",
                "query": query, "content_type": self.headers.get("X-Upload-Content-Type") or meta.get("contentType"),
                "metadata": meta.get("metadata")}
            location = f"{self.store.url}/upload/storage/v1/b/{bucket}/o?uploadType=resumable&upload_id={upload_id}"
            return self._send(200, b"", headers={"Location": location})
        if kind == "resumable" and method in ("PUT", "POST") and query.get("upload_id") in self.store._uploads:
            upload = self.store._uploads[query["upload_id"]]
            upload["data"] += body
            total = (self.headers.get("Content-Range") or "").rpartition("/")[2]
            if total not in ("*", "") and int(total) == len(upload["data"]):
                del self.store._uploads[query["upload_id"]]
                obj = self.store.put(upload["bucket"], upload["name"], upload["data"], upload["query"],
                                     upload["content_type"], upload["metadata"])
                return self._json(obj.resource())
            received = len(upload["data"])
            return self._send(308, b"", headers={"Range": f"bytes=0-{received - 1}"} if received else {})
        raise _Error(501, f"gcs_emulator does not serve upload {method} {query}")

    def _batch(self, body: bytes) -> None:
        replies = []
        for _, request in _parts(self.headers.get("Content-Type", ""), body):
            line = request.replace(b"\r\n", b"\n").split(b"\n", 1)[0].decode()
            m = re.fullmatch(r"DELETE /storage/v1/b/([^/]+)/o/([^ ?]+)(?:\?(\S*))? HTTP/1\.1", line.strip())
            if not m:
                raise _Error(501, f"gcs_emulator batches only DELETE, got {line!r}")
            try:
                self.store.delete(urllib.parse.unquote(m[1]), urllib.parse.unquote(m[2]),
                                  dict(urllib.parse.parse_qsl(m[3] or "")))
                replies.append("HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
            except _Error as e:
                text = json.dumps({"error": {"code": e.status, "message": e.message}})
                replies.append(f"HTTP/1.1 {e.status} Error\r\nContent-Type: application/json\r\n"
                               f"Content-Length: {len(text)}\r\n\r\n{text}")
        boundary = f"batch_{uuid.uuid4().hex}"
        out = "".join(f"--{boundary}\r\nContent-Type: application/http\r\n\r\n{r}\r\n" for r in replies)
        self._send(200, (out + f"--{boundary}--\r\n").encode(), f"multipart/mixed; boundary={boundary}")


def _boundary(content_type: str) -> bytes:
    m = re.search(r'boundary="?([^";]+)"?', content_type)
    if not m:
        raise _Error(400, f"no multipart boundary in {content_type!r}")
    return m[1].encode()


def _parts(content_type: str, body: bytes) -> list[tuple[bytes, bytes]]:
    """(headers, body) of each part of a multipart body. Clients end lines with CRLF or (gcsfs) LF;
    a part's body ends with the line break before the next boundary, which is not part of it."""
    out = []
    for chunk in body.split(b"--" + _boundary(content_type))[1:]:
        if chunk.startswith(b"--"):
            break
        chunk = chunk[2:] if chunk.startswith(b"\r\n") else chunk[1:] if chunk.startswith(b"\n") else chunk
        crlf, lf = chunk.find(b"\r\n\r\n"), chunk.find(b"\n\n")
        if crlf != -1 and (lf == -1 or crlf < lf):
            headers, data, ending = chunk[:crlf], chunk[crlf + 4:], b"\r\n"
        elif lf != -1:
            headers, data, ending = chunk[:lf], chunk[lf + 2:], b"\n"
        else:
            raise _Error(400, "a multipart part without a blank line after its headers")
        out.append((headers, data[:-len(ending)] if data.endswith(ending) else data))
    return out


def _multipart(content_type: str, body: bytes) -> tuple[dict, bytes]:
    """(metadata, data) of a multipart/related upload: a JSON part, then the object's bytes."""
    parts = _parts(content_type, body)
    if len(parts) != 2:
        raise _Error(400, f"a multipart upload has 2 parts, got {len(parts)}")
    return json.loads(parts[0][1]), parts[1][1]
