"""Files and the Batch API: upload a JSONL of chat requests, create a batch, read its output.

Moonshot's Batch API is OpenAI's: ``files.create(purpose="batch")``, ``batches.create(
input_file_id=..., endpoint="/v1/chat/completions", completion_window="24h")``, then
``batches.retrieve`` until ``status == "completed"`` and ``files.content(output_file_id)``. Each
output line carries its request's ``usage``. Here a batch runs when :meth:`complete_batch` is
called, or (``auto_complete_batches``) on its first retrieve after creation.
"""

from __future__ import annotations

import json
import time
from typing import Any

from ._chat import ChatEndpoint
from ._wire import RecordedRequest, _dumps, _Handler, _HTTPError

__all__ = ["BatchEndpoints"]


class BatchEndpoints(ChatEndpoint):
    """``/v1/files`` and ``/v1/batches``."""

    def _files_route(
        self, h: _Handler, rec: RecordedRequest, path: str, raw: bytes, body: Any
    ) -> None:
        method = h.command
        parts = path.strip("/").split("/")[2:]  # after v1/files
        if not parts:
            if method == "POST":
                self._send_json(h, rec, 200, self._upload(h, raw))
            else:
                self._require(method, "GET")
                with self._lock:
                    data = [meta for meta, _ in self.files.values()]
                self._send_json(h, rec, 200, {"object": "list", "data": data})
            return
        file_id = parts[0]
        with self._lock:
            entry = self.files.get(file_id)
        if entry is None:
            raise _HTTPError(404, "resource_not_found_error", f"file {file_id} not found")
        meta, content = entry
        if parts[1:] == ["content"]:
            self._require(method, "GET")
            self._send(h, rec, 200, content, "application/octet-stream")
        elif method == "DELETE":
            with self._lock:
                self.files.pop(file_id, None)
            self._send_json(h, rec, 200, {"id": file_id, "object": "file", "deleted": True})
        else:
            self._require(method, "GET")
            self._send_json(h, rec, 200, meta)

    def _batches_route(self, h: _Handler, rec: RecordedRequest, path: str, body: Any) -> None:
        method = h.command
        parts = path.strip("/").split("/")[2:]  # after v1/batches
        if not parts:
            if method == "POST":
                self._send_json(h, rec, 200, self._create_batch(body))
            else:
                self._require(method, "GET")
                with self._lock:
                    data = [dict(b) for b in self.batches.values()]
                self._send_json(h, rec, 200, {"object": "list", "data": data})
            return
        batch_id = parts[0]
        with self._lock:
            batch = self.batches.get(batch_id)
        if batch is None:
            raise _HTTPError(404, "resource_not_found_error", f"batch {batch_id} not found")
        if parts[1:] == ["cancel"]:
            self._require(method, "POST")
            with self._lock:
                if batch["status"] in ("validating", "in_progress"):
                    batch["status"] = "cancelled"
                    batch["cancelled_at"] = int(time.time())
            self._send_json(h, rec, 200, dict(batch))
            return
        self._require(method, "GET")
        if self.auto_complete_batches and batch["status"] == "in_progress":
            self.complete_batch(batch_id)
        with self._lock:
            self._send_json(h, rec, 200, dict(batch))

    # -- files -----------------------------------------------------------------------------

    def _upload(self, h: _Handler, raw: bytes) -> dict[str, Any]:
        fields = _multipart(h.headers.get("Content-Type", ""), raw)
        if "file" not in fields:
            raise _HTTPError(400, "invalid_request_error", "Invalid request: file is required")
        filename, content = fields["file"]
        purpose = fields.get("purpose", ("", b""))[1].decode("utf-8", "replace")
        return self.add_file(content, filename=filename or "upload.jsonl", purpose=purpose)

    def add_file(
        self, content: bytes, *, filename: str = "upload.jsonl", purpose: str = "batch"
    ) -> dict[str, Any]:
        """Store a file as if it had been uploaded; returns its file object."""
        file_id = f"file-{self._next_id()}"
        meta = {
            "id": file_id,
            "object": "file",
            "bytes": len(content),
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "ok",
            "status_details": "",
        }
        with self._lock:
            self.files[file_id] = (meta, bytes(content))
        return dict(meta)

    # -- batches -------------------------------------------------------------------------------

    def _create_batch(self, body: Any) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise _HTTPError(400, "invalid_request_error", "Invalid request: body is not JSON")
        file_id = body.get("input_file_id")
        with self._lock:
            known = file_id in self.files
        if not known:
            raise _HTTPError(
                400, "invalid_request_error", f"Invalid request: input file {file_id} not found"
            )
        if body.get("endpoint") != "/v1/chat/completions":
            raise _HTTPError(
                400,
                "invalid_request_error",
                "Invalid request: endpoint must be /v1/chat/completions",
            )
        lines = self._input_lines(str(file_id))
        batch_id = f"batch_{self._next_id()}"
        batch: dict[str, Any] = {
            "id": batch_id,
            "object": "batch",
            "endpoint": body["endpoint"],
            "input_file_id": file_id,
            "completion_window": body.get("completion_window", "24h"),
            "status": "in_progress",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": int(time.time()),
            "in_progress_at": int(time.time()),
            "completed_at": None,
            "cancelled_at": None,
            "request_counts": {"total": len(lines), "completed": 0, "failed": 0},
            "metadata": body.get("metadata"),
        }
        with self._lock:
            self.batches[batch_id] = batch
        return dict(batch)

    def _input_lines(self, file_id: str) -> list[str]:
        with self._lock:
            _, content = self.files[file_id]
        return [line for line in content.decode("utf-8").splitlines() if line.strip()]

    def complete_batch(self, batch_id: str) -> dict[str, Any]:
        """Run every request of a batch now; its output (and error) file holds one line each."""
        with self._lock:
            batch = self.batches[batch_id]
            if batch["status"] != "in_progress":
                return dict(batch)
        outputs: list[bytes] = []
        errors: list[bytes] = []
        for number, line in enumerate(self._input_lines(batch["input_file_id"])):
            custom_id: Any = None
            try:
                request = json.loads(line)
                custom_id = request.get("custom_id")
                status, result = self._batch_request(request.get("body"))
            except (ValueError, AttributeError):
                status, result = (
                    400,
                    {
                        "error": {
                            "type": "invalid_request_error",
                            "message": (f"line {number + 1} is not a batch request"),
                        }
                    },
                )
            record = {
                "id": f"batch_req_{self._next_id()}",
                "custom_id": custom_id,
                "response": {"status_code": status, "request_id": self._next_id(), "body": result}
                if status == 200
                else None,
                "error": None if status == 200 else {"code": status, **result["error"]},
            }
            (outputs if status == 200 else errors).append(_dumps(record))
        output = self.add_file(
            b"\n".join(outputs) + b"\n", filename="output.jsonl", purpose="batch_output"
        )
        error_file = (
            self.add_file(
                b"\n".join(errors) + b"\n", filename="errors.jsonl", purpose="batch_output"
            )
            if errors
            else None
        )
        with self._lock:
            batch["status"] = "completed"
            batch["completed_at"] = int(time.time())
            batch["output_file_id"] = output["id"]
            batch["error_file_id"] = error_file["id"] if error_file else None
            batch["request_counts"] = {
                "total": len(outputs) + len(errors),
                "completed": len(outputs),
                "failed": len(errors),
            }
            return dict(batch)

    def _batch_request(self, body: Any) -> tuple[int, dict[str, Any]]:
        """One batch line's chat completion: (status, response body or error body)."""
        try:
            model, info, _ = self._validate(body, False)
            if model.startswith("kimi-k3") and not model.startswith("kimi-k3."):
                raise _HTTPError(
                    400, "invalid_request_error", f"Model {model} is not available in batch"
                )
            limit = body.get("max_tokens") or body.get("max_completion_tokens")
            limit = limit if isinstance(limit, int) else info.default_max_tokens
            n = body.get("n") or 1
            prompt = self._count(body)
            if prompt + limit > info.context_window:
                raise _HTTPError(
                    400,
                    "invalid_request_error",
                    f"Invalid request: Your request exceeded model token limit: "
                    f"{info.context_window}",
                )
        except _HTTPError as err:
            return err.status, {"error": {"type": err.error_type, "message": err.message}}
        reply = self._reply_for(body)
        cut = reply.cut(limit)
        text = "".join(p.text for p in reply.pieces[:cut] if p.key == b"content")
        completion = (reply.cumulative[cut - 1] if cut else 0) * n
        billed, reported = self._usage(prompt, completion, 0, stream=False)
        with self._lock:
            self.batch_billed.append(billed)
        finish = "length" if cut < len(reply.pieces) else "stop"
        return 200, {
            "id": f"chatcmpl-{self._next_id()}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish,
                }
                for i in range(n)
            ],
            "usage": reported,
        }


def _multipart(content_type: str, raw: bytes) -> dict[str, tuple[str, bytes]]:
    """The fields of a ``multipart/form-data`` body: name -> (filename, content)."""
    boundary = ""
    for part in content_type.split(";"):
        key, _, value = part.strip().partition("=")
        if key.lower() == "boundary":
            boundary = value.strip('"')
    if not boundary:
        raise _HTTPError(400, "invalid_request_error", "Invalid request: not multipart/form-data")
    fields: dict[str, tuple[str, bytes]] = {}
    for chunk in raw.split(b"--" + boundary.encode()):
        if b"\r\n\r\n" not in chunk:
            continue
        head, _, content = chunk.partition(b"\r\n\r\n")
        if content.endswith(b"\r\n"):
            content = content[:-2]
        name = filename = ""
        for line in head.decode("utf-8", "replace").split("\r\n"):
            if line.lower().startswith("content-disposition:"):
                for item in line.split(";")[1:]:
                    key, _, value = item.strip().partition("=")
                    if key == "name":
                        name = value.strip('"')
                    elif key == "filename":
                        filename = value.strip('"')
        if name:
            fields[name] = (filename, content)
    return fields
