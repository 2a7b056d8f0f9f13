"""`shardserve batch`: an OpenAI batch file through the engine, one result line per request as it finishes.

Input lines are OpenAI's batch format, `{"custom_id", "method": "POST", "url": "/v1/completions" |
"/v1/chat/completions", "body": {...}}`. Each request goes through the same FastAPI app `shardserve serve` runs
(in process, no socket: validation, errors and response bodies are the server's own), at most `concurrency` at a
time; continuous batching does the rest. Output lines are OpenAI's: `{"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error": null}`, or `"response": null` with an `error` for a line that is not a request. A
rerun with the same output file skips the custom_ids already written (a last line cut short by a kill is dropped
first), so an interrupted batch resumes where it stopped. Under `ray job submit` the engine joins the job's cluster
(RAY_ADDRESS, cluster/launch.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from dataclasses import dataclass, field

import httpx
from tqdm import tqdm

logger = logging.getLogger(__name__)

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")


@dataclass
class BatchReport:
    written: int = 0  # result lines written by this run (answers, HTTP errors and bad lines)
    skipped: int = 0  # custom_ids already in the output file
    failed: int = 0  # of those written: bad lines and non-2xx answers
    errors: list[str] = field(default_factory=list)  # the bad lines' messages

    def summary(self) -> str:
        return f"{self.written} results written ({self.failed} errors), {self.skipped} already done"


def done_ids(output_path: str) -> set[str]:
    """The custom_ids of an earlier run's output; a last line cut short (killed mid-write) is truncated away."""
    if not os.path.exists(output_path):
        return set()
    with open(output_path, "rb+") as f:
        data = f.read()
        keep = data.rfind(b"\n") + 1  # everything after the last newline is a partial line
        if keep != len(data):
            logger.warning("%s: dropping a partial last line (%d bytes) before resuming", output_path, len(data) - keep)
            f.truncate(keep)
        ids = set()
        for n, line in enumerate(data[:keep].splitlines(), 1):
            try:
                ids.add(json.loads(line)["custom_id"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{output_path}:{n}: not a batch result line ({e}); use a new output file") from None
    ids.discard(None)
    return ids


def parse_line(raw: str, lineno: int) -> tuple[str | None, dict | None, str | None]:
    """(custom_id, request, error message) of one input line; request is {url, body}."""
    try:
        item = json.loads(raw)
    except ValueError as e:
        return None, None, f"line {lineno}: invalid JSON ({e})"
    if not isinstance(item, dict):
        return None, None, f"line {lineno}: a JSON object expected, found {type(item).__name__}"
    cid = item.get("custom_id")
    if not isinstance(cid, str) or not cid:
        return None, None, f"line {lineno}: 'custom_id' must be a non-empty string"
    if item.get("method", "POST") != "POST":
        return cid, None, f"line {lineno}: 'method' must be POST, found {item.get('method')!r}"
    if item.get("url") not in ENDPOINTS:
        return cid, None, f"line {lineno}: 'url' must be one of {list(ENDPOINTS)}, found {item.get('url')!r}"
    body = item.get("body")
    if not isinstance(body, dict):
        return cid, None, f"line {lineno}: 'body' must be a JSON object"
    if body.get("stream"):
        return cid, None, f"line {lineno}: 'stream' is not supported in a batch"
    return cid, {"url": item["url"], "body": body}, None


def _result(cid: str | None, response: dict | None = None, error: str | None = None) -> dict:
    err = None if error is None else {"code": "invalid_request", "message": error}
    return {"id": f"batch_req_{uuid.uuid4().hex}", "custom_id": cid, "response": response, "error": err}


async def run_batch(app, input_path: str, output_path: str, concurrency: int, progress: bool = True) -> BatchReport:
    """Every request line of `input_path` through `app`, results appended to `output_path` as they finish."""
    report = BatchReport()
    done = done_ids(output_path)
    with open(input_path, encoding="utf-8", errors="replace") as f:
        lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
    seen: set[str] = set()
    todo: list[tuple[str, dict]] = []
    bad: list[dict] = []
    for n, line in lines:
        cid, request, error = parse_line(line, n)
        if cid is not None and cid in done:
            report.skipped += 1
            continue
        if cid is not None and cid in seen:
            error = f"line {n}: custom_id {cid!r} repeats an earlier line"
            cid = None  # the first line with this id keeps it
        if error is not None:
            bad.append(_result(cid, error=error))
            report.errors.append(error)
            continue
        seen.add(cid)
        todo.append((cid, request))
    sem = asyncio.Semaphore(concurrency)
    bar = tqdm(total=len(todo) + len(bad), desc="batch", unit="req", disable=not progress)
    with open(output_path, "a", encoding="utf-8") as out:

        def write(result: dict) -> None:
            out.write(json.dumps(result) + "\n")
            out.flush()  # a result is on disk once written: a rerun resumes after it
            report.written += 1
            bar.update(1)

        for result in bad:
            report.failed += 1
            write(result)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://batch", timeout=None) as client:

            async def one(cid: str, request: dict) -> None:
                async with sem:
                    r = await client.post(request["url"], json=request["body"])
                try:
                    body = r.json()
                except ValueError:  # not the app's JSON (cannot happen through its error middleware; kept as text)
                    body = {"error": {"message": r.text, "type": "server_error"}}
                if r.status_code >= 300:
                    report.failed += 1
                write(_result(cid, {"status_code": r.status_code, "request_id": f"req_{uuid.uuid4().hex}", "body": body}))

            await asyncio.gather(*(one(cid, request) for cid, request in todo))
    bar.close()
    return report
