// The portal's Client-Portal protocol, driven by the real socket.io-client from npm
// against a running `tessera serve` (started by tessera/tests/portal_node.rs, which sets
// TESSERA_PORTAL, TESSERA_API, TESSERA_KEY and the grace period TESSERA_GRACE_MS).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import { io } from 'socket.io-client';
import { PORTAL, KEY, sleep, rest, newRoom, token, request, waitFor, waitDisconnect } from './helpers.mjs';

const GRACE_MS = Number(process.env.TESSERA_GRACE_MS || 2000);

/** Connects a socket (no automatic reconnection: tests drive reconnection themselves). */
function connect(opts = {}) {
  return new Promise((resolve, reject) => {
    const s = io(PORTAL, { reconnection: false, forceNew: true, ...opts });
    s.on('connect', () => resolve(s));
    s.on('connect_error', reject);
  });
}

const userAgent = { sdk: { version: '5.1', type: 'JavaScript' } };

async function join(room, user, role = 'presenter') {
  const s = await connect();
  const events = [];
  for (const ev of ['participant', 'text', 'stream', 'drop']) s.on(ev, (d) => events.push([ev, d]));
  const [status, info] = await request(s, 'login', { token: await token(room, user, role), userAgent, protocol: '1.2' });
  assert.equal(status, 'ok', JSON.stringify(info));
  return { s, info, events };
}

test('login returns identity, permissions, room snapshot and a ticket', async () => {
  const room = await newRoom();
  const alice = await join(room, 'alice');
  const { info } = alice;
  assert.equal(info.user, 'alice');
  assert.equal(info.role, 'presenter');
  assert.deepEqual(info.permission, { publish: { audio: true, video: true }, subscribe: { audio: true, video: true } });
  assert.equal(info.room.id, room);
  assert.deepEqual(info.room.views, ['common']);
  assert.deepEqual(info.room.participants, [{ id: info.id, user: 'alice', role: 'presenter' }]);
  // The room's view yields one mixed stream from the start.
  assert.equal(info.room.streams.length, 1);
  const mixed = info.room.streams[0];
  assert.equal(mixed.id, `${room}-common`);
  assert.equal(mixed.type, 'mixed');
  assert.equal(mixed.info.label, 'common');
  // No input yet: one empty full-size region (fluid template).
  assert.deepEqual(mixed.info.layout, [{ region: { id: '1', shape: 'rectangle', area: { left: '0/1', top: '0/1', width: '1/1', height: '1/1' } } }]);
  assert.deepEqual(mixed.media.tracks.map((t) => t.type), ['audio', 'video']);
  const ticket = JSON.parse(Buffer.from(info.reconnectionTicket, 'base64').toString());
  assert.equal(ticket.participantId, info.id);
  assert.ok(ticket.notAfter > Date.now());

  // The participant is visible over REST.
  const ps = await rest('GET', `/v1/rooms/${room}/participants`);
  assert.deepEqual(ps.data.map((p) => p.user), ['alice']);
  alice.s.close();
});

test('join notifications and text between two clients', async () => {
  const room = await newRoom();
  const alice = await join(room, 'alice');
  const bob = await join(room, 'bob', 'viewer');
  assert.equal(bob.info.room.participants.length, 2);
  const joinEv = await waitFor(() => alice.events.find(([e, d]) => e === 'participant' && d.action === 'join'), 'join');
  assert.deepEqual(joinEv[1].data, { id: bob.info.id, user: 'bob', role: 'viewer' });
  assert.ok(!bob.events.some(([e]) => e === 'participant'), 'the joiner gets no join for itself');

  assert.deepEqual(await request(alice.s, 'text', { to: 'all', message: 'hello all' }), ['ok', undefined]);
  const t1 = await waitFor(() => bob.events.find(([e]) => e === 'text'), 'text to all');
  assert.deepEqual(t1[1], { from: alice.info.id, to: 'all', message: 'hello all' });
  // The sender gets its own broadcast too, as from OWT.
  const echo = await waitFor(() => alice.events.find(([e]) => e === 'text'), 'the sender\'s own text');
  assert.deepEqual(echo[1], { from: alice.info.id, to: 'all', message: 'hello all' });

  assert.deepEqual(await request(bob.s, 'text', { to: alice.info.id, message: 'just you' }), ['ok', undefined]);
  const t2 = await waitFor(() => alice.events.find(([e, d]) => e === 'text' && d.to === 'me'), 'private text');
  assert.deepEqual(t2[1], { from: bob.info.id, to: 'me', message: 'just you' });

  assert.deepEqual(await request(bob.s, 'text', { to: 'nobody', message: 'x' }), ['error', 'Target participant does NOT exist: nobody']);
  assert.deepEqual(await request(bob.s, 'text', { to: 5, message: 'x' }), ['error', 'Invalid receiver']);
  const [st, why] = await request(bob.s, 'text', { to: 'all', message: 'y'.repeat(3000) });
  assert.equal(st, 'error');
  assert.match(why, /longer than 2048/);

  // logout: others see the leave.
  assert.deepEqual(await request(bob.s, 'logout'), ['ok', undefined]);
  const leave = await waitFor(() => alice.events.find(([e, d]) => e === 'participant' && d.action === 'leave'), 'leave');
  assert.equal(leave[1].data, bob.info.id);
  bob.s.close();
  alice.s.close();
});

test('relogin inside the grace period resumes the same participant', async () => {
  const room = await newRoom();
  const alice = await join(room, 'alice');
  const bob = await join(room, 'bob');
  await waitFor(() => alice.events.find(([e]) => e === 'participant'), 'join');

  // Refresh the ticket first, as clients do before it expires.
  const [st, ticket] = await request(alice.s, 'refreshReconnectionTicket');
  assert.equal(st, 'ok');
  assert.equal(JSON.parse(Buffer.from(ticket, 'base64').toString()).participantId, alice.info.id);

  // The network drops: close the transport under the client.
  alice.s.io.engine.close();
  await sleep(200);
  // While alice is away bob talks to her; the message must reach her after relogin.
  assert.deepEqual(await request(bob.s, 'text', { to: alice.info.id, message: 'while you were away' }), ['ok', undefined]);

  const s2 = await connect();
  const replayed = [];
  s2.on('text', (d) => replayed.push(d));
  const [rs, newTicket] = await request(s2, 'relogin', ticket);
  assert.equal(rs, 'ok', newTicket);
  assert.equal(typeof newTicket, 'string');
  assert.equal(JSON.parse(Buffer.from(newTicket, 'base64').toString()).participantId, alice.info.id);
  await waitFor(() => replayed.length === 1, 'queued text replayed');
  assert.deepEqual(replayed[0], { from: bob.info.id, to: 'me', message: 'while you were away' });

  // Still the same participant: bob can reach her, nobody saw a leave.
  await sleep(GRACE_MS + 500);
  assert.ok(!bob.events.some(([e, d]) => e === 'participant' && d.action === 'leave'), 'no leave for a resumed participant');
  const ps = await rest('GET', `/v1/rooms/${room}/participants`);
  assert.deepEqual(ps.data.map((p) => p.id).sort(), [alice.info.id, bob.info.id].sort());

  // A second relogin on the same socket is refused.
  assert.deepEqual(await request(s2, 'relogin', newTicket), ['error', 'Connection is in service']);
  s2.close();
  bob.s.close();
});

test('after the grace period the participant leaves and the ticket is useless', async () => {
  const room = await newRoom();
  const alice = await join(room, 'alice');
  const bob = await join(room, 'bob');
  alice.s.io.engine.close();
  const leave = await waitFor(
    () => bob.events.find(([e, d]) => e === 'participant' && d.action === 'leave'),
    'leave after grace', GRACE_MS + 3000);
  assert.equal(leave[1].data, alice.info.id);
  const s2 = await connect();
  const gone = waitDisconnect(s2);
  assert.deepEqual(await request(s2, 'relogin', alice.info.reconnectionTicket), ['error', 'Client does NOT exist']);
  await gone;

  // Forged and altered tickets are refused clearly, and end that socket only.
  const decoded = JSON.parse(Buffer.from(bob.info.reconnectionTicket, 'base64').toString());
  const stolen = Buffer.from(JSON.stringify({ ...decoded, participantId: 'someone-else' })).toString('base64');
  const extended = Buffer.from(JSON.stringify({ ...decoded, notAfter: decoded.notAfter + 3600e3 })).toString('base64');
  for (const [ticket, reason] of [
    ['not a ticket', 'Invalid reconnection ticket'],
    [stolen, 'Invalid reconnection ticket signature'],
    [extended, 'Invalid reconnection ticket signature'],
  ]) {
    const s3 = await connect();
    const closed = waitDisconnect(s3);
    assert.deepEqual(await request(s3, 'relogin', ticket), ['error', reason]);
    await closed;
  }
  assert.deepEqual(await request(bob.s, 'text', { to: 'all', message: 'bob unharmed' }), ['ok', undefined]);
  bob.s.close();
});

function forgeToken(room, claims, key = KEY) {
  const b64u = (o) => Buffer.from(JSON.stringify(o)).toString('base64url');
  const now = Math.floor(Date.now() / 1000);
  // The grant signs the envelope's host and secure flag too.
  const host = new URL(PORTAL).host;
  const payload = { jti: crypto.randomBytes(16).toString('hex'), room, user: 'mallory', role: 'presenter', iat: now, exp: now + 60, host, secure: false, ...claims };
  const head = b64u({ alg: 'HS256', typ: 'JWT' });
  const body = b64u(payload);
  const sig = crypto.createHmac('sha256', key).update(`${head}.${body}`).digest('base64url');
  return Buffer.from(JSON.stringify({ tokenId: payload.jti, host, secure: false, signature: `${head}.${body}.${sig}` })).toString('base64');
}

async function loginError(tok, extra = {}) {
  const s = await connect();
  const closed = waitDisconnect(s);
  const [status, reason] = await request(s, 'login', { token: tok, userAgent, protocol: '1.2', ...extra });
  assert.equal(status, 'error');
  await closed; // a failed login closes the socket
  return reason;
}

test('login rejections', async () => {
  const room = await newRoom({ participantLimit: 1 });
  assert.equal(await loginError('not a token'), 'Malformed token');
  assert.equal(await loginError(forgeToken(room, {}, 'some-other-key-123456')), 'Invalid token signature');
  assert.equal(await loginError(forgeToken(room, { exp: Math.floor(Date.now() / 1000) - 1 })), 'Token expired');
  // A correctly signed token (we hold the service key) for a room that does not exist.
  assert.equal(await loginError(forgeToken('no-such-room', {})), 'Room not found: no-such-room');
  // A role the room does not define.
  assert.equal(await loginError(forgeToken(room, { role: 'emperor' })), 'Invalid role');

  const tok = await token(room, 'solo');
  assert.equal(await loginError(tok, { protocol: '9.9' }), 'Unknown client protocol');
  // The protocol is checked before the token, so that attempt did not use the token up.
  const s = await connect();
  const [st] = await request(s, 'login', { token: tok, userAgent, protocol: '1.2' });
  assert.equal(st, 'ok');
  assert.equal(await loginError(tok), 'Token already used');
  assert.equal(await loginError(await token(room, 'second')), 'Room is full');
  assert.equal(await loginError(await token(room, 'ua'), { userAgent: { sdk: {} } }), 'User agent info is incorrect');
  s.close();
});

test('requests before login, unknown requests and bad payloads', async () => {
  const s = await connect();
  assert.deepEqual(await request(s, 'text', { to: 'all', message: 'x' }), ['error', 'Illegal request']);
  assert.deepEqual(await request(s, 'publish', {}), ['error', 'Illegal request']);
  assert.deepEqual(await request(s, 'frobnicate', {}), ['error', 'Unknown request: frobnicate']);
  const [st, why] = await request(s, 'login', 42);
  assert.equal(st, 'error');
  assert.match(why, /^login: invalid request data/);
  s.close();

  const room = await newRoom();
  const viewer = await join(room, 'vic', 'viewer');
  const media = { tracks: [{ type: 'video', mid: '0', source: 'camera' }] };
  assert.deepEqual(await request(viewer.s, 'publish', { media, transport: { type: 'webrtc' } }), ['error', 'unauthorized']);
  assert.deepEqual(await request(viewer.s, 'frobnicate', {}), ['error', 'Unknown request: frobnicate']);
  const [st2, why2] = await request(viewer.s, 'text', 'not an object');
  assert.equal(st2, 'error');
  assert.match(why2, /^text: invalid request data/);
  // The socket survived all of that.
  assert.deepEqual(await request(viewer.s, 'text', { to: 'all', message: 'still here' }), ['ok', undefined]);
  viewer.s.close();
});

test('oversized messages and floods close only the offender', async () => {
  const room = await newRoom();
  const good = await join(room, 'good');
  const big = await join(room, 'big');
  const closed = waitDisconnect(big.s);
  big.s.emit('text', { to: 'all', message: 'z'.repeat(2_000_000) });
  await closed;

  const flood = await join(room, 'flood');
  const floodClosed = waitDisconnect(flood.s);
  for (let i = 0; i < 500; i++) flood.s.emit('text', { to: good.info.id, message: 'spam' + i });
  await floodClosed;

  // The good client is unharmed.
  assert.deepEqual(await request(good.s, 'text', { to: 'all', message: 'fine' }), ['ok', undefined]);
  const ps = await rest('GET', `/v1/rooms/${room}/participants`);
  assert.ok(ps.data.some((p) => p.id === good.info.id));
  good.s.close();
});

test('kicking over REST sends drop and closes the session', async () => {
  const room = await newRoom();
  const alice = await join(room, 'alice');
  const bob = await join(room, 'bob');
  const closed = waitDisconnect(bob.s);
  const r = await rest('DELETE', `/v1/rooms/${room}/participants/${bob.info.id}`);
  assert.equal(r.status, 200);
  await waitFor(() => bob.events.find(([e]) => e === 'drop'), 'drop');
  await closed;
  const leave = await waitFor(() => alice.events.find(([e, d]) => e === 'participant' && d.action === 'leave'), 'leave');
  assert.equal(leave[1].data, bob.info.id);
  const ps = await rest('GET', `/v1/rooms/${room}/participants`);
  assert.deepEqual(ps.data.map((p) => p.id), [alice.info.id]);
  assert.equal((await rest('DELETE', `/v1/rooms/${room}/participants/${bob.info.id}`)).status, 404);

  // Deleting the room drops everyone.
  const aliceClosed = waitDisconnect(alice.s);
  assert.equal((await rest('DELETE', `/v1/rooms/${room}`)).status, 200);
  await waitFor(() => alice.events.find(([e]) => e === 'drop'), 'drop on room delete');
  await aliceClosed;
});

test('websocket-only clients work too', async () => {
  const room = await newRoom();
  const s = await connect({ transports: ['websocket'] });
  const [status, info] = await request(s, 'login', { token: await token(room, 'ws'), userAgent, protocol: '1.2' });
  assert.equal(status, 'ok');
  assert.equal(info.user, 'ws');
  s.close();
});
