// Walks a whole chat through Genesys's own guest chat SDK (purecloud-guest-chat-client 13.2.0,
// unmodified) and `ws` against guestd's emulator, checking every reply and frame against the
// SDK's models, then the error cases. Run by tests/sdk.rs:  node walk.mjs http://127.0.0.1:PORT
// Prints one line per failed check and a closing "N passed, M failed"; exits 1 on any failure.
import { createRequire } from 'node:module';
const require = createRequire(import.meta.url);
const platformClient = require('purecloud-guest-chat-client');
const WebSocket = require('ws');

const base = process.argv[2];
if (!base) {
  console.error('usage: node walk.mjs http://127.0.0.1:PORT');
  process.exit(2);
}

let passed = 0;
let failed = 0;
function check(ok, what, got) {
  if (ok) {
    passed += 1;
  } else {
    failed += 1;
    console.log(`FAIL ${what}${got === undefined ? '' : `: ${JSON.stringify(got).slice(0, 400)}`}`);
  }
}

const client = platformClient.ApiClient.instance;
// setEnvironment builds https://api.<env>; the emulator is plain HTTP on loopback.
client.setEnvironment('mypurecloud.com');
client.config.basePath = base;
client.setReturnExtendedResponses(true);
const api = new platformClient.WebChatApi();

// SDK 13.2.0's logger writes "[REDACTED]" into the request's header object, which is the client's
// shared defaultHeaders, so every call after the first would be sent with that as its token. Set
// the Authorization header per call instead of relying on setJwt alone.
let jwt = '';
async function call(fn) {
  client.defaultHeaders = jwt ? { Authorization: `Bearer ${jwt}` } : {};
  try {
    return await fn();
  } catch (e) {
    return e; // extended responses: {status, body, ...}
  }
}
function withJwt(token, fn) {
  const saved = jwt;
  jwt = token;
  return call(fn).finally(() => {
    jwt = saved;
  });
}

async function admin(path, body) {
  const r = await fetch(`${base}/emulator/conversations/${path}`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify(body ?? {}),
  });
  return r.status;
}

const isErrorBody = (b) =>
  b && typeof b.message === 'string' && typeof b.code === 'string' && typeof b.status === 'number' &&
  typeof b.contextId === 'string' && Array.isArray(b.details) && Array.isArray(b.errors);
const isPath = (u) => typeof u === 'string' && u.startsWith('/api/v2/');
const isMember = (m) =>
  m && typeof m.id === 'string' && typeof m.role === 'string' && typeof m.state === 'string' &&
  ['CONNECTED', 'DISCONNECTED', 'ALERTING'].includes(m.state);
const isMessage = (m) =>
  m && typeof m.id === 'string' && m.conversation?.id && m.sender?.id && typeof m.body === 'string' &&
  typeof m.bodyType === 'string' && !Number.isNaN(Date.parse(m.timestamp));

// 1. Create, as the SDK's CreateWebChatConversationRequest.
const memberInfo = {
  displayName: 'Ann', firstName: 'Ann', lastName: 'Lee', email: 'ann@example.com',
  phoneNumber: '+15550100', avatarImageUrl: 'https://example.com/a.png', customFields: { plan: 'gold' },
};
const created = await call(() => api.postWebchatGuestConversations({
  organizationId: 'org', deploymentId: 'dep',
  routingTarget: { targetType: 'QUEUE', targetAddress: 'Support' }, memberInfo,
}));
check(created.status === 200, 'create answers 200', created);
const chat = created.body;
check(typeof chat.id === 'string' && typeof chat.jwt === 'string' && chat.member?.id, 'create reply', chat);
check(typeof chat.eventStreamUri === 'string' && chat.eventStreamUri.startsWith('ws'), 'eventStreamUri', chat.eventStreamUri);
jwt = chat.jwt;
client.setJwt(jwt);
const me = chat.member.id;

// 2. The stream, through ws.
const frames = [];
const ws = new WebSocket(chat.eventStreamUri);
await new Promise((resolve, reject) => { ws.on('open', resolve); ws.on('error', reject); });
ws.on('message', (data) => frames.push(JSON.parse(data.toString())));
async function frame(pred, what) {
  for (let i = 0; i < 200; i += 1) {
    const f = frames.find(pred);
    if (f) return f;
    await new Promise((r) => setTimeout(r, 25));
  }
  check(false, `frame: ${what}`, frames.slice(-5));
  return undefined;
}
ws.send(JSON.stringify({ message: 'ping' }));
await frame((f) => f.eventBody?.message === 'pong', 'pong');

// 3. Members, with every parameter combination the SDK sends (empty when unset).
for (const opts of [undefined, {}, { pageSize: 1 }, { pageNumber: 1 }, { excludeDisconnectedMembers: false },
  { excludeDisconnectedMembers: true }, { pageSize: 1, pageNumber: 2, excludeDisconnectedMembers: true }, { pageSize: 0 }]) {
  const r = await call(() => api.getWebchatGuestConversationMembers(chat.id, opts));
  check(r.status === 200, `members ${JSON.stringify(opts)} answers 200`, r.body ?? r);
  if (r.status !== 200) continue;
  const p = r.body;
  check(Array.isArray(p.entities) && p.entities.every(isMember), `members ${JSON.stringify(opts)} entities`, p);
  check(typeof p.pageCount === 'number' && isPath(p.selfUri) && isPath(p.firstUri) && isPath(p.lastUri),
    `members ${JSON.stringify(opts)} paging`, p);
}
const paged = (await call(() => api.getWebchatGuestConversationMembers(chat.id, { pageSize: 1 }))).body;
check(paged.pageCount === 2 && isPath(paged.nextUri) && paged.previousUri === undefined, 'members page 1 of 2', paged);
const page2 = await call(() => client.callApi(paged.nextUri, 'GET', {}, {}, {}, {}, null, ['Guest Chat JWT'], ['application/json'], ['application/json']));
check(page2.status === 200 && page2.body.pageNumber === 2 && page2.body.entities.length === 1, 'following nextUri', page2.body);

// 4. One member: what the guest gave at create comes back.
const one = await call(() => api.getWebchatGuestConversationMember(chat.id, me));
check(one.status === 200 && isMember(one.body), 'get member', one.body);
for (const k of ['firstName', 'lastName', 'email', 'phoneNumber', 'avatarImageUrl']) {
  check(one.body?.[k] === memberInfo[k], `member ${k}`, one.body?.[k]);
}
check(one.body?.customFields?.plan === 'gold', 'member customFields', one.body?.customFields);

// 5. Send and type as the guest.
const sent = await call(() => api.postWebchatGuestConversationMemberMessages(chat.id, me, { body: 'hello', bodyType: 'standard' }));
check(sent.status === 200 && isMessage(sent.body) && sent.body.body === 'hello' && sent.body.sender.id === me, 'send', sent.body);
const echo = await frame((f) => f.metadata?.type === 'message' && f.eventBody?.id === sent.body?.id, 'the guest message echoed');
check(echo && typeof echo.metadata.CorrelationId === 'string' && echo.topicName.endsWith('.messages') && echo.version === '2', 'frame envelope', echo);
const typed = await call(() => api.postWebchatGuestConversationMemberTyping(chat.id, me));
check(typed.status === 200 && typed.body?.sender?.id === me, 'typing', typed.body);
const fourK = 'x'.repeat(4000);
const longest = await call(() => api.postWebchatGuestConversationMemberMessages(chat.id, me, { body: fourK, bodyType: 'standard' }));
check(longest.status === 200, '4,000 characters are taken', longest.body);

// 6. An agent joins and writes (admin API).
check(await admin(`${chat.id}/agent/join`) === 200, 'admin agent/join');
const agentOn = await frame((f) => f.metadata?.type === 'member-change' && f.eventBody?.member?.state === 'CONNECTED' && f.eventBody.member.id !== me, 'agent CONNECTED');
check(await admin(`${chat.id}/agent/message`, { body: 'How can I help?' }) === 200, 'admin agent/message');
await frame((f) => f.metadata?.type === 'message' && f.eventBody?.body === 'How can I help?', 'agent message');

// 7. Messages: every parameter combination, ascending by default, paging by `next`.
const all = await call(() => api.getWebchatGuestConversationMessages(chat.id));
check(all.status === 200 && all.body.entities.every(isMessage), 'messages', all.body);
const ms = all.body.entities;
const times = ms.map((m) => Date.parse(m.timestamp));
check(times.every((t, i) => i === 0 || times[i - 1] <= t), 'ascending by default', ms.map((m) => m.timestamp));
check(ms.length >= 4, 'every message listed', ms.length);
const desc = await call(() => api.getWebchatGuestConversationMessages(chat.id, { sortOrder: 'descending' }));
check(desc.status === 200 && desc.body.entities[0]?.id === ms[ms.length - 1]?.id, 'descending', desc.body);
for (const opts of [{ after: '' }, { before: '' }, { sortOrder: '' }, { maxResults: 0 }, { after: ms[0].id },
  { before: ms[ms.length - 1].id }, { after: ms[0].id, before: ms[ms.length - 1].id, sortOrder: 'ascending', maxResults: 2 }]) {
  const r = await call(() => api.getWebchatGuestConversationMessages(chat.id, opts));
  check(r.status === 200 && Array.isArray(r.body.entities), `messages ${JSON.stringify(opts)}`, r.body ?? r);
}
const first = await call(() => api.getWebchatGuestConversationMessages(chat.id, { maxResults: 1 }));
check(first.body.entities.length === 1 && isPath(first.body.next) && isPath(first.body.nextUri), 'a page with a next path', first.body);
let seen = [...first.body.entities];
let next = first.body.next;
for (let i = 0; next && i < 20; i += 1) {
  const r = await call(() => client.callApi(next, 'GET', {}, {}, {}, {}, null, ['Guest Chat JWT'], ['application/json'], ['application/json']));
  check(r.status === 200, 'following next', r.body);
  seen = seen.concat(r.body.entities);
  next = r.body.next;
}
check(JSON.stringify(seen.map((m) => m.id)) === JSON.stringify(ms.map((m) => m.id)), 'paging by next gives every message once, in order', seen.map((m) => m.id));
const oneMsg = await call(() => api.getWebchatGuestConversationMessage(chat.id, sent.body.id));
check(oneMsg.status === 200 && oneMsg.body.id === sent.body.id, 'get message', oneMsg.body);

// 8. Errors: ErrorBody JSON with the right status, for every refusal.
async function refused(what, status, fn) {
  const r = await fn();
  check(r.status === status, `${what} answers ${status}`, { status: r.status, body: r.body });
  check(isErrorBody(r.body), `${what} is an ErrorBody`, r.body);
}
await refused('a bad jwt', 401, () => withJwt('not-a-jwt', () => api.getWebchatGuestConversationMembers(chat.id)));
const other = (await call(() => api.postWebchatGuestConversations({ organizationId: 'org', deploymentId: 'dep', routingTarget: { targetType: 'QUEUE', targetAddress: 'Support' }, memberInfo: { displayName: 'Bo' } }))).body;
await refused("another chat's jwt", 401, () => withJwt(other.jwt, () => api.getWebchatGuestConversationMembers(chat.id)));
check(await admin(`${other.id}/expire-jwt`) === 200, 'admin expire-jwt');
await refused('an expired jwt', 401, () => withJwt(other.jwt, () => api.getWebchatGuestConversationMembers(other.id)));
await refused('missing fields', 400, () => call(() => api.postWebchatGuestConversations({ organizationId: 'org', routingTarget: { targetType: 'QUEUE', targetAddress: 'Support' }, memberInfo: { displayName: 'Ann' } })));
await refused('4,001 characters', 400, () => call(() => api.postWebchatGuestConversationMemberMessages(chat.id, me, { body: `${fourK}y`, bodyType: 'standard' })));
await refused('200,000 characters', 400, () => call(() => api.postWebchatGuestConversationMemberMessages(chat.id, me, { body: 'z'.repeat(200000), bodyType: 'standard' })));
await refused('an oversized request', 413, () => call(() => api.postWebchatGuestConversations({ organizationId: 'org', deploymentId: 'dep', routingTarget: { targetType: 'QUEUE', targetAddress: 'Support' }, memberInfo: { displayName: 'Ann', customFields: { big: 'b'.repeat(2_500_000) } } })));
await refused('an unknown conversation', 404, () => call(() => api.getWebchatGuestConversationMembers('00000000-0000-0000-0000-000000000000')));
await refused('an unknown member', 404, () => call(() => api.getWebchatGuestConversationMember(chat.id, 'nobody')));
await refused('an unknown message', 404, () => call(() => api.getWebchatGuestConversationMessage(chat.id, 'nothing')));
check(!frames.some((f) => f.error), 'no error frames');

// 9. Leave: every member DISCONNECTED, the chat never reopens.
const left = await call(() => api.deleteWebchatGuestConversationMember(chat.id, me));
check(left.status === 204, 'leave answers 204', left);
await frame((f) => f.metadata?.type === 'member-change' && f.eventBody?.member?.id === me && f.eventBody.member.state === 'DISCONNECTED', 'guest DISCONNECTED');
const final = await call(() => api.getWebchatGuestConversationMembers(chat.id));
check(final.status === 200 && final.body.entities.length >= 3 && final.body.entities.every((m) => m.state === 'DISCONNECTED' && m.leaveDate), 'every member DISCONNECTED with a leave date', final.body);
await refused('sending to an ended chat', 400, () => call(() => api.postWebchatGuestConversationMemberMessages(chat.id, me, { body: 'late', bodyType: 'standard' })));
check(frames.every((f) => typeof f.topicName === 'string' && f.eventBody !== undefined && typeof f.metadata?.CorrelationId === 'string'), 'every frame has topicName, eventBody, metadata.CorrelationId', frames.find((f) => !f.metadata?.CorrelationId));
check(agentOn !== undefined, 'the walk saw the agent');
ws.close();
console.log(`${passed} passed, ${failed} failed`);
process.exit(failed === 0 ? 0 : 1);
