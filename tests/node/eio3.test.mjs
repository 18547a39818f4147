// Older OWT clients: socket.io-client 2.x (Engine.IO 3, Socket.IO protocol 4; what the
// OWT JS SDK 4.x bundles) against a running `tessera serve`, next to a current client.
// Started by tessera/tests/portal_node.rs, which sets TESSERA_PORTAL, TESSERA_API and
// TESSERA_KEY, and runs the server with ping_interval_ms = 1000, ping_timeout_ms = 2000.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import ioV2 from 'socket.io-client-v2';
import { io as ioV4 } from 'socket.io-client';
import { PORTAL, newRoom, token, request, waitFor, waitDisconnect } from './helpers.mjs';

const require = createRequire(import.meta.url);
const PING_INTERVAL_MS = 1000;
const PING_TIMEOUT_MS = 2000;

/** Connects with socket.io-client 2.x (no automatic reconnection). */
function connectV2(opts = {}) {
  return new Promise((resolve, reject) => {
    const s = ioV2(PORTAL, { reconnection: false, forceNew: true, ...opts });
    s.on('connect', () => resolve(s));
    s.on('connect_error', reject);
    s.on('error', reject);
  });
}

function connectV4() {
  return new Promise((resolve, reject) => {
    const s = ioV4(PORTAL, { reconnection: false, forceNew: true });
    s.on('connect', () => resolve(s));
    s.on('connect_error', reject);
  });
}

function record(s) {
  const events = [];
  for (const ev of ['participant', 'text', 'stream', 'drop']) s.on(ev, (d) => events.push([ev, d]));
  return events;
}

/** Logs in on `s` (user agent as the OWT JS SDK 4.x sends it). */
async function login(s, room, user, protocol) {
  const userAgent = { sdk: { version: '4.3', type: 'JavaScript' } };
  const [status, info] = await request(s, 'login', { token: await token(room, user), userAgent, protocol });
  assert.equal(status, 'ok', JSON.stringify(info));
  assert.equal(info.user, user);
  return info;
}

test('the v2 client speaks Engine.IO 3', () => {
  const parser = require('socket.io-client-v2/node_modules/engine.io-parser');
  assert.equal(parser.protocol, 3);
  assert.match(require('socket.io-client-v2/package.json').version, /^2\./);
});

for (const [label, opts, protocol] of [
  ['polling then websocket upgrade', {}, '1.2'],
  ['websocket only', { transports: ['websocket'] }, '1.0'],
  ['polling only', { transports: ['polling'] }, '1.1'],
]) {
  test(`socket.io-client 2.x (${label}, protocol ${protocol}): login, join notification, text, logout`, async () => {
    const room = await newRoom();
    const old = await connectV2(opts);
    const oldEvents = record(old);
    const me = await login(old, room, 'old', protocol);
    assert.deepEqual(me.room.participants.map((p) => p.user), ['old']);
    if (!opts.transports) {
      // Default transports: starts with long-polling and upgrades to websocket.
      await waitFor(() => old.io.engine.transport.name === 'websocket', 'upgrade to websocket');
    } else {
      assert.equal(old.io.engine.transport.name, opts.transports[0]);
    }

    // A current (v4) client joins: the old one gets the participant notification.
    const cur = await connectV4();
    const curEvents = record(cur);
    const them = await login(cur, room, 'new', '1.2');
    const joined = await waitFor(() => oldEvents.find(([e, d]) => e === 'participant' && d.action === 'join'), 'join');
    assert.deepEqual(joined[1].data, { id: them.id, user: 'new', role: 'presenter' });

    // Text both ways, with characters outside the BMP (UTF-16 lengths in EIO3 payloads).
    const message = 'héllo 🎉 from the past';
    assert.deepEqual(await request(old, 'text', { to: 'all', message }), ['ok', undefined]);
    const t1 = await waitFor(() => curEvents.find(([e]) => e === 'text'), 'text from the v2 client');
    assert.deepEqual(t1[1], { from: me.id, to: 'all', message });
    assert.deepEqual(await request(cur, 'text', { to: me.id, message: 'back at you 👋' }), ['ok', undefined]);
    const t2 = await waitFor(() => oldEvents.find(([e, d]) => e === 'text' && d.to === 'me'), 'text to the v2 client');
    assert.deepEqual(t2[1], { from: them.id, to: 'me', message: 'back at you 👋' });

    // Stays connected across several of its own heartbeats.
    await new Promise((r) => setTimeout(r, PING_INTERVAL_MS * 2.5));
    assert.ok(old.connected, 'v2 client still connected after a few pings');

    assert.deepEqual(await request(old, 'logout'), ['ok', undefined]);
    const left = await waitFor(() => curEvents.find(([e, d]) => e === 'participant' && d.action === 'leave'), 'leave');
    assert.equal(left[1].data, me.id);
    old.close();
    cur.close();
  });
}

for (const transports of [['websocket'], ['polling']]) {
  test(`the server closes a v2 session that stops pinging (${transports[0]})`, async () => {
    const room = await newRoom();
    const s = await connectV2({ transports });
    await login(s, room, 'quiet', '1.1');
    // Silence the client's heartbeat: no pings, and no client-side timeout of its own,
    // so only the server can end the session.
    const engine = s.io.engine;
    engine.removeListener('heartbeat', engine.onHeartbeat);
    engine.setPing = () => {};
    engine.onHeartbeat = () => {};
    clearTimeout(engine.pingIntervalTimer);
    clearTimeout(engine.pingTimeoutTimer);
    const started = Date.now();
    const reason = await Promise.race([
      waitDisconnect(s),
      new Promise((r) => setTimeout(() => r('still connected'), (PING_INTERVAL_MS + PING_TIMEOUT_MS) * 3)),
    ]);
    assert.equal(reason, 'transport close');
    const elapsed = Date.now() - started;
    assert.ok(elapsed >= PING_INTERVAL_MS + PING_TIMEOUT_MS - 1100, `closed after ${elapsed} ms`);
    s.close();
  });
}

test('a v2 client may still send CONNECT for "/" and is refused other namespaces', async () => {
  const s = await connectV2({ transports: ['websocket'] });
  // What an older client that announces "/" itself sends (Socket.IO CONNECT `0` in an
  // Engine.IO message: `40` on the wire): tolerated, nothing changes.
  s.io.engine.write('0');
  const admin = s.io.socket('/admin');
  const err = await new Promise((resolve) => admin.on('error', resolve));
  assert.equal(err, 'Invalid namespace');
  const [status, why] = await request(s, 'text', { to: 'all', message: 'x' });
  assert.deepEqual([status, why], ['error', 'Illegal request']);
  s.close();
});
