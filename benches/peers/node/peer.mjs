// The benchmark's Node peer: a guest-chat supervisor as a user of Genesys's own SDK would write
// it, with the same job and the same stdin/stdout lines as `guestd run` for what the benchmark
// measures (attach commands in; connected, reconnected, message and ended lines out). REST goes
// through purecloud-guest-chat-client 13.2.0 (a members reconcile after every reconnect, as an
// SDK user checks the chat is still alive); the event stream through `ws`; heartbeat tracking;
// reconnect with backoff inside a grace window; the end read from member-change events. It does
// less than guestd (no backfill, no inactivity rule, no journal), which only flatters it.
//
// SDK 13.2.0 writes "[REDACTED]" into the shared default headers after its first call (see
// ../shared/protocol/genesys-guest-chat.md): the Authorization header is set for each call.
//
// Settings from the environment, as peer.py: PEER_HEARTBEAT (s), PEER_TOLERANCE, PEER_GRACE (s);
// a PEM root for wss through NODE_EXTRA_CA_CERTS (Node's own variable).
import { createRequire } from 'node:module';
import readline from 'node:readline';
const require = createRequire(import.meta.url);
const platformClient = require('purecloud-guest-chat-client');
const WebSocket = require('ws');

const HEARTBEAT = Number(process.env.PEER_HEARTBEAT ?? 30) * 1000;
const TOLERANCE = Number(process.env.PEER_TOLERANCE ?? 2);
const GRACE = Number(process.env.PEER_GRACE ?? 120) * 1000;

let seq = 0;
function emit(obj) {
  seq += 1;
  process.stdout.write(JSON.stringify({ ...obj, seq, ts: new Date().toISOString() }) + '\n');
}

const client = platformClient.ApiClient.instance;
client.setEnvironment('mypurecloud.com');
const api = new platformClient.WebChatApi();
let basePath = null;

async function members(s) {
  // Headers are read when the request is built, synchronously: safe to set per call.
  client.defaultHeaders = { Authorization: `Bearer ${s.jwt}` };
  return api.getWebchatGuestConversationMembers(s.conv, { pageSize: 25, pageNumber: 1, excludeDisconnectedMembers: false });
}

class Session {
  constructor(a) {
    this.conv = a.conversation_id;
    this.member = a.member_id;
    this.jwt = a.jwt;
    this.uri = a.event_stream_uri;
    this.started = Date.now();
    this.ended = false;
    this.lostAt = null;
    this.delay = 500;
    this.agentLeftAt = null;
  }

  end(reason) {
    if (this.ended) return;
    this.ended = true;
    emit({ type: 'ended', conversation_id: this.conv, reason, duration_ms: Date.now() - this.started });
  }

  connect() {
    if (this.ended) return;
    const ws = new WebSocket(this.uri, { headers: { Authorization: `Bearer ${this.jwt}` }, perMessageDeflate: false, maxPayload: 256 * 1024 });
    let missed = 0;
    let timer = null;
    const arm = () => {
      clearTimeout(timer);
      timer = setTimeout(() => {
        missed += 1;
        if (missed >= TOLERANCE) {
          ws.terminate();
          return;
        }
        if (ws.readyState === WebSocket.OPEN) ws.send('{"message":"ping"}');
        arm();
      }, HEARTBEAT * 1.5);
    };
    ws.on('open', () => {
      const again = this.lostAt !== null;
      this.lostAt = null;
      this.delay = 500;
      emit({ type: again ? 'reconnected' : 'connected', conversation_id: this.conv });
      arm();
      if (again) {
        members(this).then(
          (r) => {
            const me = (r.entities ?? []).find((m) => m.id === this.member);
            if (me && me.state === 'DISCONNECTED') this.end('server_ended');
          },
          () => {},
        );
      }
    });
    ws.on('message', (raw) => {
      missed = 0;
      arm();
      let ev;
      try {
        ev = JSON.parse(raw);
      } catch {
        return;
      }
      const meta = ev.metadata ?? {};
      const body = ev.eventBody ?? {};
      if (meta.type === 'member-change') {
        const m = body.member ?? {};
        if (m.state === 'DISCONNECTED') {
          if (m.id === this.member) {
            const recent = this.agentLeftAt && Date.now() - this.agentLeftAt < 10000;
            this.end(recent ? 'agent_ended' : 'server_ended');
            ws.close();
          } else {
            this.agentLeftAt = Date.now();
          }
        }
      } else if (meta.type === 'message') {
        emit({ type: 'message', conversation_id: this.conv, body: body.body });
      }
    });
    ws.on('unexpected-response', (_req, res) => {
      if (res.statusCode === 401 || res.statusCode === 404) {
        this.end(res.statusCode === 401 ? 'token_expired' : 'server_ended');
      }
      ws.terminate();
    });
    ws.on('error', () => {});
    ws.on('close', () => {
      clearTimeout(timer);
      if (this.ended) return;
      const now = Date.now();
      this.lostAt ??= now;
      if (now - this.lostAt > GRACE) {
        this.end('reconnect_grace_expired');
        return;
      }
      const wait = this.delay * (0.7 + Math.random() * 0.6);
      this.delay = Math.min(this.delay * 2, 15000);
      setTimeout(() => this.connect(), wait);
    });
  }
}

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity });
emit({ type: 'ready' });
rl.on('line', (line) => {
  let cmd;
  try {
    cmd = JSON.parse(line);
  } catch {
    emit({ type: 'command_error', error: 'not JSON' });
    return;
  }
  if (cmd.cmd !== 'attach') return;
  if (basePath === null) {
    // The REST base: the emulator's address, from the first stream URI.
    const u = new URL(cmd.event_stream_uri);
    basePath = `${u.protocol === 'wss:' ? 'https' : 'http'}://${u.host}`;
    client.config.basePath = basePath;
  }
  new Session(cmd).connect();
});
