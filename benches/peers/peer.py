#!/usr/bin/env python3
"""A minimal guest-chat supervisor written by hand, as a user would without guestd.

The benchmark's peer: same job, same inputs and outputs as `guestd run` for what the benchmark
measures (attach commands on stdin; heartbeat tracking, reconnect with backoff inside a grace
window, end detection from member-change events, JSON lines on stdout). It does less than guestd
(no REST reconcile or backfill, no inactivity rule, no journal), which only flatters it.

Settings come from the environment: PEER_HEARTBEAT (seconds), PEER_TOLERANCE, PEER_GRACE,
PEER_CA_FILE (a PEM root to trust for wss).
"""

import asyncio
import json
import os
import random
import ssl
import sys
import time

import websockets

HEARTBEAT = float(os.environ.get("PEER_HEARTBEAT", "30"))
TOLERANCE = int(os.environ.get("PEER_TOLERANCE", "2"))
GRACE = float(os.environ.get("PEER_GRACE", "120"))
CA_FILE = os.environ.get("PEER_CA_FILE")
SSL = ssl.create_default_context(cafile=CA_FILE) if CA_FILE else None
seq = 0


def emit(obj):
    global seq
    seq += 1
    obj["seq"] = seq
    obj["ts"] = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z"
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


class Session:
    def __init__(self, conv, member, jwt, uri):
        self.conv, self.member, self.jwt, self.uri = conv, member, jwt, uri
        self.roles = {}
        self.agent_left_at = None
        self.ended = False
        self.started = time.monotonic()

    def end(self, reason):
        if not self.ended:
            self.ended = True
            emit({"type": "ended", "conversation_id": self.conv, "reason": reason,
                  "duration_ms": int((time.monotonic() - self.started) * 1000)})

    async def run(self):
        lost_at = None
        delay = 0.5
        while not self.ended:
            try:
                extra = {"ssl": SSL} if self.uri.startswith("wss:") and SSL else {}
                async with websockets.connect(self.uri, ping_interval=None, max_size=256 * 1024, **extra,
                                              additional_headers={"Authorization": f"Bearer {self.jwt}"}) as ws:
                    emit({"type": "reconnected" if lost_at else "connected", "conversation_id": self.conv})
                    lost_at, delay = None, 0.5
                    await self.read(ws)
            except websockets.exceptions.InvalidStatus as e:
                if e.response.status_code in (401, 404):
                    self.end("token_expired" if e.response.status_code == 401 else "server_ended")
                    return
            except (OSError, websockets.exceptions.WebSocketException, asyncio.TimeoutError):
                pass
            if self.ended:
                return
            now = time.monotonic()
            lost_at = lost_at or now
            if now - lost_at > GRACE:
                self.end("reconnect_grace_expired")
                return
            await asyncio.sleep(delay * random.uniform(0.7, 1.3))
            delay = min(delay * 2, 15)

    async def read(self, ws):
        missed = 0
        while True:
            try:
                raw = await asyncio.wait_for(ws.recv(), HEARTBEAT * 1.5)
            except asyncio.TimeoutError:
                missed += 1
                if missed >= TOLERANCE:
                    return
                await ws.send('{"message":"ping"}')
                continue
            missed = 0
            try:
                ev = json.loads(raw)
            except ValueError:
                continue
            meta = ev.get("metadata") or {}
            body = ev.get("eventBody") or {}
            if meta.get("type") == "member-change":
                m = body.get("member", {})
                if m.get("state") == "DISCONNECTED":
                    if m.get("id") == self.member:
                        recent = self.agent_left_at and time.monotonic() - self.agent_left_at < 10
                        self.end("agent_ended" if recent else "server_ended")
                        return
                    self.agent_left_at = time.monotonic()
            elif meta.get("type") == "message":
                emit({"type": "message", "conversation_id": self.conv, "body": body.get("body")})


async def main():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 20)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    tasks = set()
    emit({"type": "ready"})
    while True:
        line = await reader.readline()
        if not line:
            break
        try:
            cmd = json.loads(line)
        except ValueError:
            emit({"type": "command_error", "error": "not JSON"})
            continue
        if cmd.get("cmd") == "attach":
            s = Session(cmd["conversation_id"], cmd["member_id"], cmd["jwt"], cmd["event_stream_uri"])
            t = asyncio.create_task(s.run())
            tasks.add(t)
            t.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)


if __name__ == "__main__":
    asyncio.run(main())
