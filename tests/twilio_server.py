"""A local Twilio-compatible Messages API for tests, on the standard library's HTTP
server in a thread.

It checks what the real API checks on the calls selfserve makes (the account path,
HTTP Basic auth with the account SID and auth token, a form-encoded body with To,
From and Body) and answers in Twilio's shapes: 201 with a Message resource, errors
as {"code", "message", "more_info", "status"}. Tests script the next answers (429
with Retry-After, 500, 400 with a Twilio error code) and count what arrived.
"""

from __future__ import annotations

import base64
import json
import re
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import format_datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

ACCOUNT_SID = "AC" + "0123456789abcdef" * 2
AUTH_TOKEN = "test-auth-token-0123456789abcdef"
FROM_NUMBER = "+15005550006"
MESSAGES_PATH = re.compile(r"^/2010-04-01/Accounts/(?P<sid>AC[0-9a-f]{32})/Messages\.json$")


@dataclass(frozen=True)
class Reply:
    """How to answer one create. The default accepts the message."""

    status: int = 201
    code: int | None = None
    message: str = ""
    retry_after: str | None = None
    # Accept the message, then hold the answer until `release` is set (a client that
    # goes away meanwhile never learns the outcome).
    hold: bool = False


@dataclass
class Seen:
    method: str
    path: str
    fields: dict[str, str]
    authorised: bool
    status: int = 0


@dataclass
class FakeTwilio:
    account_sid: str = ACCOUNT_SID
    auth_token: str = AUTH_TOKEN
    requests: list[Seen] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)
    script: deque[Reply] = field(default_factory=deque)
    default: Reply = field(default_factory=Reply)
    list_status: int = 200  # e.g. 404: a gateway without the Messages list endpoint
    held: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None

    # --- test-facing ---------------------------------------------------------

    @property
    def base_url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def reply(self, *replies: Reply) -> None:
        with self.lock:
            self.script.extend(replies)

    def reset(self) -> None:
        with self.lock:
            self.requests.clear()
            self.messages.clear()
            self.script.clear()
            self.default = Reply()
            self.list_status = 200
        self.release.set()  # free any handler still held by an earlier test
        self.held = threading.Event()
        self.release = threading.Event()

    @property
    def creates(self) -> list[Seen]:
        """Every create request that arrived, whatever the answer."""
        with self.lock:
            return [r for r in self.requests if r.method == "POST"]

    @property
    def lookups(self) -> list[Seen]:
        with self.lock:
            return [r for r in self.requests if r.method == "GET"]

    def sent_to(self, phone: str) -> list[dict[str, Any]]:
        """Messages accepted for `phone`."""
        with self.lock:
            return [m for m in self.messages if m["to"] == phone]

    def start(self) -> FakeTwilio:
        fake = self

        class Handler(_Handler):
            twilio = fake

        self._server = _Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- server side ------------------------------------------------------------

    def _next_reply(self) -> Reply:
        with self.lock:
            return self.script.popleft() if self.script else self.default

    def _resource(self, fields: dict[str, str]) -> dict[str, Any]:
        sid = "SM" + uuid.uuid4().hex
        now = format_datetime(datetime.now(UTC))
        return {
            "account_sid": self.account_sid,
            "api_version": "2010-04-01",
            "body": fields["Body"],
            "date_created": now,
            "date_sent": None,
            "date_updated": now,
            "direction": "outbound-api",
            "error_code": None,
            "error_message": None,
            "from": fields["From"],
            "messaging_service_sid": None,
            "num_media": "0",
            "num_segments": "1",
            "price": None,
            "price_unit": "USD",
            "sid": sid,
            "status": "queued",
            "subresource_uris": {
                "media": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}/Media.json"
            },
            "to": fields["To"],
            "uri": f"/2010-04-01/Accounts/{self.account_sid}/Messages/{sid}.json",
        }


def error_body(status: int, code: int, message: str) -> dict[str, Any]:
    return {
        "code": code,
        "message": message,
        "more_info": f"https://www.twilio.com/docs/errors/{code}",
        "status": status,
    }


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up on a held answer: expected, nothing to report.
        return None


class _Handler(BaseHTTPRequestHandler):
    twilio: FakeTwilio

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _authorised(self, account_sid: str) -> bool:
        header = self.headers.get("Authorization", "")
        if not header.startswith("Basic "):
            return False
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return False
        fake = self.twilio
        return user == fake.account_sid == account_sid and password == fake.auth_token

    def _begin(self, method: str) -> tuple[Seen, dict[str, str]] | None:
        parts = urlsplit(self.path)
        match = MESSAGES_PATH.match(parts.path)
        if method == "POST":
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length).decode("utf-8")
            content_type = self.headers.get("Content-Type", "")
            if not content_type.startswith("application/x-www-form-urlencoded"):
                raw = ""
        else:
            raw = parts.query
        fields = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        seen = Seen(
            method, parts.path, fields, match is not None and self._authorised(match["sid"])
        )
        with self.twilio.lock:
            self.twilio.requests.append(seen)
        if match is None:
            seen.status = 404
            self._send_json(
                404, error_body(404, 20404, f"The requested resource {parts.path} was not found")
            )
            return None
        if not seen.authorised:
            seen.status = 401
            self._send_json(401, error_body(401, 20003, "Authenticate"))
            return None
        return seen, fields

    def do_POST(self) -> None:
        begun = self._begin("POST")
        if begun is None:
            return
        seen, fields = begun
        fake = self.twilio
        for name, code, text in (
            ("To", 21604, "A 'To' phone number is required."),
            ("From", 21603, "A 'From' phone number is required."),
            ("Body", 21602, "Message body is required."),
        ):
            if not fields.get(name):
                seen.status = 400
                self._send_json(400, error_body(400, code, text))
                return
        reply = fake._next_reply()
        if reply.status != 201:
            seen.status = reply.status
            headers = {"Retry-After": reply.retry_after} if reply.retry_after else {}
            code = reply.code or reply.status * 100
            self._send_json(
                reply.status, error_body(reply.status, code, reply.message or "error"), headers
            )
            return
        resource = fake._resource(fields)
        resource["status_callback"] = fields.get("StatusCallback")  # kept for assertions
        with fake.lock:
            fake.messages.append(resource)
        seen.status = 201
        if reply.hold:
            release = fake.release
            fake.held.set()
            release.wait(timeout=30)
        self._send_json(201, {k: v for k, v in resource.items() if k != "status_callback"})

    def do_GET(self) -> None:
        begun = self._begin("GET")
        if begun is None:
            return
        seen, fields = begun
        fake = self.twilio
        if fake.list_status != 200:
            seen.status = fake.list_status
            self._send_json(
                fake.list_status,
                error_body(fake.list_status, 20404, "The requested resource was not found"),
            )
            return
        size = int(fields.get("PageSize") or 50)
        with fake.lock:
            found = [
                {k: v for k, v in m.items() if k != "status_callback"}
                for m in reversed(fake.messages)
                if ("To" not in fields or m["to"] == fields["To"])
                and ("From" not in fields or m["from"] == fields["From"])
            ][:size]
        seen.status = 200
        uri = f"/2010-04-01/Accounts/{fake.account_sid}/Messages.json?PageSize={size}&Page=0"
        self._send_json(
            200,
            {
                "messages": found,
                "end": max(len(found) - 1, 0),
                "first_page_uri": uri,
                "next_page_uri": None,
                "page": 0,
                "page_size": size,
                "previous_page_uri": None,
                "start": 0,
                "uri": uri,
            },
        )
