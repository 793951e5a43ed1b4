#!/usr/bin/env python3
"""End-to-end scenario for the `nearby` server, written only from docs/protocol.md.

Usage: python3 clients/python/scenario.py [path/to/nearby]   (default: target/debug/nearby)

Starts its own server on a free port with a temporary data directory and a
4 s location TTL, runs the scenario, kills the server, and prints
`N passed, M failed` as the last line (exit status 1 if anything failed).
Dependency: the `websockets` package (see requirements.txt).
"""

import asyncio
import json
import math
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import websockets

TTL_SECS = 4
INACTIVE_WAIT_SECS = 10
FRAME_TIMEOUT = 5.0  # how long to wait for a frame we expect
QUIET_SECS = 0.4  # how long to listen to make sure nothing else arrives
DIST_TOLERANCE_M = 2.0
EARTH_RADIUS_M = 6371008.8  # mean radius; protocol.md does not say which radius

PASSWORD = "correct horse"

# Positions (WGS-84). B_NEAR is ~1 km north of A, B_FAR ~20 km north of A.
A_POS = (37.5665, 126.978)
B_NEAR = (37.57549, 126.978)
B_FAR = (37.7464, 126.978)
B_BACK = (37.5755, 126.9785)  # ~1 km again, a slightly different point
C_POS = (37.5670, 126.979)  # the stranger, right next to A


# --------------------------------------------------------------------------
# check bookkeeping

class Results:
    def __init__(self):
        self.passed = 0
        self.failed = 0

    def check(self, cond, what, detail=""):
        if cond:
            self.passed += 1
            print(f"  ok   {what}")
        else:
            self.failed += 1
            msg = f"  FAIL {what}"
            if detail:
                msg += f": {detail}"
            print(msg)
        return bool(cond)


R = Results()


class Abort(Exception):
    """A failure after which the scenario cannot meaningfully continue."""


def require(cond, what, detail=""):
    if not R.check(cond, what, detail):
        raise Abort(what)


def haversine_m(p, q):
    lat1, lon1 = map(math.radians, p)
    lat2, lon2 = map(math.radians, q)
    dlat, dlon = lat2 - lat1, lon2 - lon1
    h = math.sin(dlat / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin(dlon / 2) ** 2
    return 2 * EARTH_RADIUS_M * math.asin(math.sqrt(h))


def now_ms():
    return int(time.time() * 1000)


def step(title):
    print(f"\n== {title}")


# --------------------------------------------------------------------------
# server process

class Server:
    def __init__(self, binary):
        self.binary = binary
        self.data_dir = tempfile.mkdtemp(prefix="nearby-scenario-")
        self.stderr_file = tempfile.TemporaryFile()
        self.proc = None
        self.base = None

    def start(self):
        self.proc = subprocess.Popen(
            [self.binary, "serve", "--listen", "127.0.0.1:0",
             "--data-dir", self.data_dir, "--location-ttl-secs", str(TTL_SECS)],
            stdout=subprocess.PIPE, stderr=self.stderr_file, text=True)
        line_box = []

        def read_line():
            line_box.append(self.proc.stdout.readline())

        t = threading.Thread(target=read_line, daemon=True)
        t.start()
        t.join(15)
        line = line_box[0] if line_box else ""
        m = re.fullmatch(r"nearby listening on (http://127\.0\.0\.1:(\d+))\s*", line)
        if not m:
            raise RuntimeError(f"server did not print its listening line (got {line!r}); stderr:\n{self.stderr_tail()}")
        self.base = m.group(1)
        # keep draining stdout so the server never blocks on a full pipe
        threading.Thread(target=lambda: [None for _ in self.proc.stdout], daemon=True).start()

    def stderr_tail(self, n=4000):
        try:
            self.stderr_file.seek(0)
            return self.stderr_file.read().decode(errors="replace")[-n:]
        except Exception:
            return ""

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        shutil.rmtree(self.data_dir, ignore_errors=True)


# --------------------------------------------------------------------------
# REST

class Http:
    def __init__(self, base):
        self.base = base

    def call(self, method, path, body=None, token=None, raw_body=None, content_type="application/json",
             headers=None):
        """Returns (status, parsed JSON or None, raw text)."""
        data = None
        hdrs = dict(headers or {})
        if body is not None:
            data = json.dumps(body).encode()
        elif raw_body is not None:
            data = raw_body
        if data is not None and content_type:
            hdrs["Content-Type"] = content_type
        if token:
            hdrs["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(self.base + path, data=data, method=method, headers=hdrs)
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                status, text = resp.status, resp.read().decode()
        except urllib.error.HTTPError as e:
            status, text = e.code, e.read().decode(errors="replace")
        parsed = None
        if text:
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
        return status, parsed, text

    async def acall(self, *a, **kw):
        return await asyncio.to_thread(self.call, *a, **kw)


def is_error_body(parsed, code):
    return (isinstance(parsed, dict) and parsed.get("code") == code
            and isinstance(parsed.get("message"), str))


# --------------------------------------------------------------------------
# WebSocket client wrapper

class Client:
    def __init__(self, name, user_id, token, ws):
        self.name = name
        self.id = user_id
        self.token = token
        self.ws = ws
        self.all_frames = []  # every frame ever received, in order (but account events)
        self.account_frames = []  # friend_update / friend_removed, kept apart
        self.interval_ms = None  # the report interval the server suggests (snapshot, then `interval`)
        self.sent_points = []  # (lat, lon) of every valid location sent
        self.last_sent = None  # time.monotonic() of the last valid location sent

    async def recv(self, timeout):
        """The next frame; account events (friend list changes) are set aside
        in account_frames, since the friend list is checked over REST, and
        `interval` frames only update interval_ms (docs: report that often)."""
        deadline = time.monotonic() + timeout
        while True:
            raw = await asyncio.wait_for(self.ws.recv(), max(0.001, deadline - time.monotonic()))
            if not isinstance(raw, str):
                R.check(False, f"{self.name}: server frames are text", f"got binary {raw!r}")
                frame = {"type": "<binary>", "raw": raw}
            else:
                try:
                    frame = json.loads(raw)
                except ValueError:
                    R.check(False, f"{self.name}: server frame is JSON", raw)
                    frame = {"type": "<not-json>", "raw": raw}
            if frame.get("type") in ("friend_update", "friend_removed"):
                self.account_frames.append(frame)
                continue
            if frame.get("type") == "interval":
                ms = frame.get("interval_ms")
                R.check(isinstance(ms, int) and ms > 0, f"{self.name}: interval_ms is a positive integer", json.dumps(frame))
                self.interval_ms = ms
                continue
            if frame.get("type") == "snapshot" and "interval_ms" in frame:
                self.interval_ms = frame["interval_ms"]
            self.all_frames.append(frame)
            return frame

    async def expect(self, pred, what, timeout=FRAME_TIMEOUT):
        """Wait for a frame matching pred; any other frame on the way is a failure."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                R.check(False, f"{self.name} receives {what}", f"nothing within {timeout} s")
                return None
            try:
                frame = await self.recv(remaining)
            except asyncio.TimeoutError:
                continue
            except websockets.ConnectionClosed as e:
                R.check(False, f"{self.name} receives {what}", f"connection closed: {e}")
                return None
            if pred(frame):
                R.check(True, f"{self.name} receives {what}")
                return frame
            R.check(False, f"{self.name}: no unexpected frame while waiting for {what}", json.dumps(frame))

    async def quiet(self, what="nothing else", period=QUIET_SECS):
        """Assert no frame arrives for `period` seconds."""
        extra = []
        deadline = time.monotonic() + period
        while (remaining := deadline - time.monotonic()) > 0:
            try:
                extra.append(await self.recv(remaining))
            except asyncio.TimeoutError:
                break
            except websockets.ConnectionClosed as e:
                extra.append({"closed": str(e)})
                break
        R.check(not extra, f"{self.name} receives {what}", json.dumps(extra))

    async def send(self, obj_or_text):
        await self.ws.send(obj_or_text if isinstance(obj_or_text, (str, bytes)) else json.dumps(obj_or_text))

    async def locate(self, pos, **extra):
        await self.send({"type": "location", "lat": pos[0], "lon": pos[1], **extra})
        self.sent_points.append(pos)
        self.last_sent = time.monotonic()


def is_type(t, **fields):
    def pred(f):
        return f.get("type") == t and all(f.get(k) == v for k, v in fields.items())
    return pred


def check_friend_location(frame, who, friend, expected_m, t0):
    if frame is None:
        return
    d = frame.get("distance_m")
    R.check(isinstance(d, (int, float)) and abs(d - expected_m) <= DIST_TOLERANCE_M,
            f"{who}: distance to {friend} is {expected_m:.1f} m ± {DIST_TOLERANCE_M} (server: {d!r})")
    ts = frame.get("updated_at")
    R.check(isinstance(ts, int) and t0 - 1000 <= ts <= now_ms() + 1000,
            f"{who}: updated_at of {friend} is a current Unix-ms integer", f"got {ts!r}")


# --------------------------------------------------------------------------
# the scenario

async def signup_login(http, prefix):
    name = f"{prefix}_{secrets.token_hex(5)}"
    st, body, text = await http.acall("POST", "/v1/users", {"username": name, "password": PASSWORD})
    require(st == 201 and isinstance(body, dict) and body.get("username") == name
            and isinstance(body.get("id"), str),
            f"sign up {name} → 201 {{id (string), username}}", f"{st} {text}")
    uid = body["id"]
    st, body, text = await http.acall("POST", "/v1/sessions", {"username": name, "password": PASSWORD})
    require(st == 200 and isinstance(body, dict)
            and isinstance(body.get("token"), str) and re.fullmatch(r"[0-9a-f]{64}", body["token"], re.I)
            and body.get("user_id") == uid
            and isinstance(body.get("expires_at"), int) and body["expires_at"] > now_ms(),
            f"log in {name} → 200 {{token (64 hex), user_id, expires_at (future ms)}}", f"{st} {text}")
    return name, uid, body["token"]


async def open_ws(http, name, uid, token, via_query=False):
    ws_base = "ws" + http.base[len("http"):] + "/v1/ws"
    if via_query:
        ws = await websockets.connect(f"{ws_base}?token={urllib.parse.quote(token)}", max_size=2 ** 20)
    else:
        ws = await websockets.connect(ws_base, additional_headers={"Authorization": f"Bearer {token}"},
                                      max_size=2 ** 20)
    c = Client(name, uid, token, ws)
    first = await c.expect(lambda f: True, "a first frame", timeout=FRAME_TIMEOUT)
    R.check(first is not None and first.get("type") == "snapshot" and first.get("friends") == [],
            f"{name}: first frame is an empty snapshot (via {'?token=' if via_query else 'Authorization header'})",
            json.dumps(first))
    return c


async def scenario(http):
    t_start = now_ms()

    step("health")
    st, body, text = await http.acall("GET", "/healthz")
    R.check(st == 200 and body == {"status": "ok"}, "GET /healthz → 200 {status: ok}", f"{st} {text}")

    step("sign up and log in three users")
    a_name, a_id, a_tok = await signup_login(http, "alice")
    b_name, b_id, b_tok = await signup_login(http, "bob")
    c_name, c_id, c_tok = await signup_login(http, "carol")
    R.check(len({a_id, b_id, c_id}) == 3, "three distinct user ids")

    step("REST error cases")
    st, body, text = await http.acall("POST", "/v1/users", {"username": a_name, "password": PASSWORD})
    R.check(st == 409 and is_error_body(body, "username_taken"), "duplicate sign-up → 409 username_taken",
            f"{st} {text}")
    st, body, text = await http.acall("POST", "/v1/sessions", {"username": a_name, "password": "wrong password"})
    R.check(st == 401 and is_error_body(body, "bad_credentials"), "wrong password → 401 bad_credentials",
            f"{st} {text}")
    st, body, text = await http.acall("GET", "/v1/friends")
    R.check(st == 401 and is_error_body(body, "unauthorized"), "no token → 401 unauthorized", f"{st} {text}")
    st, body, text = await http.acall("POST", "/v1/users", raw_body=b"{not json")
    R.check(st == 400 and is_error_body(body, "bad_json"), "sign-up with malformed JSON → 400 bad_json",
            f"{st} {text}")
    st, body, text = await http.acall("PUT", f"/v1/friends/{a_id}", token=a_tok)
    R.check(st == 400 and is_error_body(body, "self"), "befriending yourself → 400 self", f"{st} {text}")
    st, body, text = await http.acall("GET", "/v1/ws", token=a_tok)
    R.check(400 <= st < 500 and is_error_body(body, "not_websocket"),
            "plain GET /v1/ws → 4xx not_websocket", f"{st} {text}")
    ws_base = "ws" + http.base[len("http"):] + "/v1/ws"
    try:
        bad = await websockets.connect(ws_base + "?token=" + "0" * 64)
        await bad.close()
        R.check(False, "WebSocket with an unknown token is refused with 401", "handshake succeeded")
    except websockets.InvalidStatus as e:
        resp = e.response
        try:
            rb = json.loads(resp.body.decode()) if resp.body else None
        except ValueError:
            rb = None
        R.check(resp.status_code == 401 and is_error_body(rb, "unauthorized"),
                "WebSocket with an unknown token is refused with 401 + JSON error body",
                f"{resp.status_code} {resp.body!r}")
    # log out: a second session of carol, revoked
    st, body, text = await http.acall("POST", "/v1/sessions", {"username": c_name, "password": PASSWORD})
    c_tok2 = body.get("token") if isinstance(body, dict) else None
    st, _, text = await http.acall("DELETE", "/v1/sessions", token=c_tok2)
    R.check(st == 204, "DELETE /v1/sessions → 204", f"{st} {text}")
    st, body, text = await http.acall("GET", "/v1/friends", token=c_tok2)
    R.check(st == 401 and is_error_body(body, "unauthorized"), "revoked token → 401 unauthorized", f"{st} {text}")

    step("befriend alice and bob (request + accept)")
    st, body, text = await http.acall("PUT", f"/v1/friends/{b_id}", token=a_tok)
    R.check(st == 200 and body == {"id": b_id, "status": "outgoing"}, "alice requests bob → outgoing",
            f"{st} {text}")
    st, body, text = await http.acall("GET", "/v1/friends", token=b_tok)
    fr = body.get("friends") if st == 200 and isinstance(body, dict) else None
    R.check(isinstance(fr, list) and len(fr) == 1
            and {k: fr[0].get(k) for k in ("id", "username", "status")}
            == {"id": a_id, "username": a_name, "status": "incoming"},
            "bob: GET /v1/friends lists alice's request as incoming", f"{st} {text}")
    st, body, text = await http.acall("PUT", f"/v1/friends/{a_id}", token=b_tok)
    R.check(st == 200 and body == {"id": a_id, "status": "friends"}, "bob accepts alice → friends", f"{st} {text}")
    for who, tok, other_id, other_name in ((a_name, a_tok, b_id, b_name), (b_name, b_tok, a_id, a_name)):
        st, body, text = await http.acall("GET", "/v1/friends", token=tok)
        R.check(st == 200 and body == {"friends": [{"id": other_id, "username": other_name,
                                                    "status": "friends", "sharing": True,
                                                    "shares_with_you": True}]},
                f"{who}: GET /v1/friends lists the friend, sharing on", f"{st} {text}")

    step("connect all three over the WebSocket")
    A = await open_ws(http, a_name, a_id, a_tok)
    B = await open_ws(http, b_name, b_id, b_tok)
    C = await open_ws(http, c_name, c_id, c_tok, via_query=True)

    try:
        await run_live(http, A, B, C, t_start)
    finally:
        for cl in (A, B, C):
            try:
                await cl.ws.close()
            except Exception:
                pass


async def run_live(http, A, B, C, t_start):
    step("the stranger carol stands right next to alice")
    await C.locate(C_POS)
    await asyncio.sleep(0.2)

    step("alice and bob about 1 km apart")
    await A.locate(A_POS, accuracy_m=5)  # unknown field: must be ignored
    await A.quiet("nothing after her own first location (bob has none yet)")
    t0 = now_ms()
    await B.locate(B_NEAR)
    d_near = haversine_m(A_POS, B_NEAR)
    f = await B.expect(is_type("friend_location", id=A.id), "friend_location for alice")
    check_friend_location(f, B.name, A.name, d_near, t0)
    f = await A.expect(is_type("friend_location", id=B.id), "friend_location for bob")
    check_friend_location(f, A.name, B.name, d_near, t0)
    await A.quiet()
    await B.quiet()

    st, body, text = await http.acall("GET", "/v1/nearby", token=A.token)
    ok = (st == 200 and isinstance(body, dict) and body.get("type") == "snapshot"
          and isinstance(body.get("friends"), list) and len(body["friends"]) == 1
          and body["friends"][0].get("id") == B.id
          and abs(body["friends"][0].get("distance_m", -1e9) - d_near) <= DIST_TOLERANCE_M)
    R.check(ok, "alice: GET /v1/nearby is a snapshot with bob at ~1 km", f"{st} {text}")

    step("bob moves ~20 km away")
    await B.locate(B_FAR)
    await A.expect(is_type("friend_left", id=B.id, reason="out_of_range"), "friend_left(bob, out_of_range)")
    await B.expect(is_type("friend_left", id=A.id, reason="out_of_range"), "friend_left(alice, out_of_range)")
    await A.quiet()
    await B.quiet()

    step("bob comes back close")
    # refresh alice too so both locations are fresh for the TTL
    await A.locate(A_POS)
    await A.quiet("nothing for her own unchanged location (bob is out of range)")
    t0 = now_ms()
    await B.locate(B_BACK)
    d_back = haversine_m(A_POS, B_BACK)
    f = await A.expect(is_type("friend_location", id=B.id), "friend_location for bob again")
    check_friend_location(f, A.name, B.name, d_back, t0)
    f = await B.expect(is_type("friend_location", id=A.id), "friend_location for alice again")
    check_friend_location(f, B.name, A.name, d_back, t0)
    await A.quiet()
    await B.quiet()

    step("alice stops sharing with bob, then shares again")
    st, body, text = await http.acall("PUT", f"/v1/friends/{B.id}/sharing", {"enabled": False}, token=A.token)
    R.check(st == 200 and body == {"id": B.id, "sharing": False}, "alice disables sharing → 200", f"{st} {text}")
    await B.expect(is_type("friend_left", id=A.id, reason="unshared"), "friend_left(alice, unshared)")
    await A.quiet("nothing (bob still shares with her)")
    await B.quiet()
    st, body, text = await http.acall("PUT", f"/v1/friends/{B.id}/sharing", {"enabled": True}, token=A.token)
    R.check(st == 200 and body == {"id": B.id, "sharing": True}, "alice re-enables sharing → 200", f"{st} {text}")
    f = await B.expect(is_type("friend_location", id=A.id), "friend_location for alice after re-sharing")
    check_friend_location(f, B.name, A.name, d_back, 0)
    await A.quiet()
    await B.quiet()

    step("alice shares only an approximate position with bob, then a precise one again")
    # both move (in place) so that their positions stay fresh for the TTL
    await A.locate(A_POS)
    await B.expect(is_type("friend_location", id=A.id), "friend_location for alice, refreshed")
    await B.locate(B_BACK)
    await A.expect(is_type("friend_location", id=B.id), "friend_location for bob, refreshed")
    st, body, text = await http.acall("PUT", f"/v1/friends/{B.id}/sharing",
                                      {"enabled": True, "precision": "approximate"}, token=A.token)
    R.check(st == 200 and body == {"id": B.id, "sharing": True, "sharing_precision": "approximate"},
            "alice shares approximately → 200", f"{st} {text}")
    f = await B.expect(is_type("friend_location", id=A.id), "friend_location for alice, approximate")
    R.check(f.get("approximate") is True and f["distance_m"] % 1000 == 0 and f["bearing_deg"] % 45 == 0,
            "bob: approximate, whole kilometres, a bearing in eighths", json.dumps(f))
    st, body, text = await http.acall("PUT", f"/v1/friends/{B.id}/sharing",
                                      {"enabled": True, "precision": "precise"}, token=A.token)
    R.check(st == 200 and body == {"id": B.id, "sharing": True}, "alice shares precisely again → 200",
            f"{st} {text}")
    f = await B.expect(is_type("friend_location", id=A.id), "friend_location for alice, precise again")
    check_friend_location(f, B.name, A.name, d_back, 0)
    R.check("approximate" not in f, "bob: precise again", json.dumps(f))
    await A.quiet()
    await B.quiet()

    step("bob unfriends alice")
    st, _, text = await http.acall("DELETE", f"/v1/friends/{A.id}", token=B.token)
    R.check(st == 204, "bob DELETE /v1/friends/alice → 204", f"{st} {text}")
    await A.expect(is_type("friend_left", id=B.id, reason="unfriended"), "friend_left(bob, unfriended)")
    await B.expect(is_type("friend_left", id=A.id, reason="unfriended"), "friend_left(alice, unfriended)")
    st, body, text = await http.acall("DELETE", f"/v1/friends/{A.id}", token=B.token)
    R.check(st == 404 and is_error_body(body, "not_friends"), "unfriending again → 404 not_friends",
            f"{st} {text}")
    st, body, text = await http.acall("PUT", f"/v1/friends/{A.id}/sharing", {"enabled": True}, token=B.token)
    R.check(st == 404 and is_error_body(body, "not_friends"), "sharing with a non-friend → 404 not_friends",
            f"{st} {text}")
    # fresh locations while not friends: nobody may hear about it
    await A.locate(A_POS)
    await B.locate(B_BACK)
    await A.quiet("nothing about a non-friend")
    await B.quiet("nothing about a non-friend")

    step("befriend again (they are near: both see each other at once)")
    st, body, text = await http.acall("PUT", f"/v1/friends/{B.id}", token=A.token)
    R.check(st == 200 and body == {"id": B.id, "status": "outgoing"}, "alice requests bob again → outgoing",
            f"{st} {text}")
    await B.quiet("nothing for a mere request")
    R.check(any(f.get("type") == "friend_update" and f.get("id") == A.id and f.get("status") == "incoming"
                for f in B.account_frames),
            "bob is pushed alice's request as a friend_update", json.dumps(B.account_frames))
    st, body, text = await http.acall("PUT", f"/v1/friends/{A.id}", token=B.token)
    R.check(st == 200 and body == {"id": A.id, "status": "friends"}, "bob accepts again → friends", f"{st} {text}")
    f = await A.expect(is_type("friend_location", id=B.id), "friend_location for bob on refriending")
    check_friend_location(f, A.name, B.name, d_back, 0)
    f = await B.expect(is_type("friend_location", id=A.id), "friend_location for alice on refriending")
    check_friend_location(f, B.name, A.name, d_back, 0)

    step(f"both stop sending: inactive after the {TTL_SECS} s TTL")
    async def wait_inactive(me, friend):
        f = await me.expect(is_type("friend_left", id=friend.id, reason="inactive"),
                            f"friend_left({friend.name}, inactive)", timeout=INACTIVE_WAIT_SECS)
        if f is not None:
            age = time.monotonic() - friend.last_sent
            R.check(age >= TTL_SECS - 0.05,
                    f"{me.name}: inactive for {friend.name} came no earlier than the TTL "
                    f"({age:.1f} s after {friend.name}'s last location)")

    await asyncio.gather(wait_inactive(A, B), wait_inactive(B, A))
    await A.quiet()
    await B.quiet()

    step("alice updates again: bob sees her come back; bob stays inactive for her")
    await A.locate(A_POS)
    f = await B.expect(is_type("friend_location", id=A.id), "friend_location for alice after inactivity")
    check_friend_location(f, B.name, A.name, d_back, 0)
    await A.quiet("nothing (bob's location has expired)")

    step("the stranger carol heard nothing")
    await C.quiet("no frames of her own (not a friend of anyone)")
    R.check(len(C.all_frames) == 1 and C.all_frames[0].get("type") == "snapshot",
            "carol received only her snapshot over the whole scenario", json.dumps(C.all_frames))
    R.check(all(fr.get("id") != C.id for cl in (A, B) for fr in cl.all_frames),
            "alice and bob never received a frame about carol")

    step("bad input on carol's connection: error frame, connection keeps working")
    bad_inputs = [
        ("bad_json", "{not json", "malformed JSON"),
        ("bad_json", "[1, 2, 3]", "JSON that is not an object"),
        ("bad_json", json.dumps({"lat": 1, "lon": 2}), "an object without type"),
        ("bad_json", json.dumps({"type": "location", "lat": "north", "lon": 2}), "lat of the wrong JSON type"),
        ("unknown_type", json.dumps({"type": "teleport"}), "an unknown type"),
        ("missing_field", json.dumps({"type": "location", "lat": 1.0}), "location without lon"),
        ("invalid_location", json.dumps({"type": "location", "lat": 91.0, "lon": 0.0}), "lat 91"),
        ("invalid_location", json.dumps({"type": "location", "lat": 0.0, "lon": -180.5}), "lon -180.5"),
        ("frame_too_large", json.dumps({"type": "location", "lat": 1.0, "lon": 2.0, "pad": "x" * 1100}),
         "a 1.1 KB text frame"),
        ("unsupported_frame", b"\x01\x02\x03", "a binary frame"),
    ]
    for code, payload, label in bad_inputs:
        await C.send(payload)
        f = await C.expect(is_type("error", code=code), f"error {code} for {label}")
        if f is not None:
            R.check(isinstance(f.get("message"), str) and f["message"],
                    f"error {code} carries a human message")
        await asyncio.sleep(0.25)  # stay well under the rate limit
    await C.quiet("no close or other frame after the bad inputs")
    await C.locate((C_POS[0] + 0.001, C_POS[1]))  # valid again: must be accepted
    await C.quiet("no error for a valid location after the bad ones")
    try:
        pong = await C.ws.ping()
        await asyncio.wait_for(pong, 5)
        R.check(True, "carol's connection answers a ping after the bad inputs")
    except Exception as e:
        R.check(False, "carol's connection answers a ping after the bad inputs", repr(e))

    step("history")
    for cl in (A, C):
        expected = cl.sent_points
        pts = None
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            st, body, text = await http.acall("GET", "/v1/me/history", token=cl.token)
            pts = body.get("points") if st == 200 and isinstance(body, dict) else None
            if isinstance(pts, list) and len(pts) >= len(expected):
                break
            await asyncio.sleep(0.2)
        got = [(p.get("lat"), p.get("lon")) for p in pts] if isinstance(pts, list) else None
        R.check(got is not None and len(got) == len(expected)
                and all(abs(g[0] - e[0]) < 1e-9 and abs(g[1] - e[1]) < 1e-9 for g, e in zip(got, expected)),
                f"{cl.name}: GET /v1/me/history returns exactly the {len(expected)} accepted points, oldest first",
                f"expected {expected}, got {st} {text[:500]}")
        ts = [p.get("ts") for p in pts] if isinstance(pts, list) else []
        R.check(ts and all(isinstance(t, int) and t_start - 1000 <= t <= now_ms() + 1000 for t in ts)
                and ts == sorted(ts), f"{cl.name}: history ts are current Unix ms, ascending", str(ts))
    # from/to/limit
    st, body, text = await http.acall("GET", "/v1/me/history?limit=2", token=A.token)
    R.check(st == 200 and isinstance(body, dict) and len(body.get("points", [])) == 2
            and [(p["lat"], p["lon"]) for p in body["points"]] == A.sent_points[:2],
            "history limit=2 returns the 2 oldest points", f"{st} {text[:300]}")
    st, body, text = await http.acall("GET", f"/v1/me/history?from={now_ms()}&to={now_ms() - 60000}",
                                      token=A.token)
    R.check(st == 400 and is_error_body(body, "bad_query"), "history with from after to → 400 bad_query",
            f"{st} {text}")

    step("rate limit on carol's connection")
    await asyncio.sleep(2.5)  # let the bucket refill
    n_before = len(C.sent_points)
    for i in range(20):
        await C.send({"type": "location", "lat": 10.0 + i / 1000, "lon": 20.0})
    errors = []
    deadline = time.monotonic() + 1.0
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            errors.append(await C.recv(remaining))
        except asyncio.TimeoutError:
            break
    R.check(len(errors) == 1 and errors[0].get("type") == "error" and errors[0].get("code") == "rate_limited",
            "20 messages at once → exactly one rate_limited error", json.dumps(errors))
    await asyncio.sleep(2.5)
    await C.locate((C_POS[0], C_POS[1]))
    await C.quiet("no error once the rate has fallen")
    await asyncio.sleep(1.5)
    st, body, text = await http.acall("GET", "/v1/me/history", token=C.token)
    n_burst = len(body.get("points", [])) - n_before - 1 if isinstance(body, dict) else -1
    R.check(10 <= n_burst <= 12, "about the burst of 10 of the 20 were accepted (history)",
            f"{n_burst} accepted")

    step("a frame over 64 KiB closes the connection with 1009")
    await C.send(json.dumps({"type": "location", "lat": 1.0, "lon": 2.0, "pad": "x" * (70 * 1024)}))
    code = None
    try:
        while True:
            await asyncio.wait_for(C.ws.recv(), 5)
    except websockets.ConnectionClosed as e:
        code = e.rcvd.code if e.rcvd else None
    except asyncio.TimeoutError:
        pass
    R.check(code == 1009, "carol's connection is closed with 1009", f"close code {code!r}")


def main():
    binary = sys.argv[1] if len(sys.argv) > 1 else "target/debug/nearby"
    server = Server(binary)
    try:
        server.start()
        print(f"server at {server.base}")
        asyncio.run(scenario(Http(server.base)))
    except Abort as e:
        print(f"aborted: {e}")
    except Exception as e:  # any crash counts as a failure
        R.check(False, "scenario ran to completion", f"{type(e).__name__}: {e}")
    finally:
        server.stop()
    if R.failed:
        tail = server.stderr_tail()
        if tail:
            print("--- server stderr (tail) ---\n" + tail)
    print(f"{R.passed} passed, {R.failed} failed")
    sys.exit(1 if R.failed else 0)


if __name__ == "__main__":
    main()
