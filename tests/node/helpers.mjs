// What the Node protocol tests share: the server under test (set by
// tessera/tests/portal_node.rs), its REST API, and waiting on Socket.IO requests.
import assert from 'node:assert/strict';
import crypto from 'node:crypto';

export const PORTAL = process.env.TESSERA_PORTAL;
export const API = process.env.TESSERA_API;
export const KEY = process.env.TESSERA_KEY;
assert.ok(PORTAL && API && KEY, 'TESSERA_PORTAL, TESSERA_API and TESSERA_KEY must be set');

export const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A management API call with the service key; resolves with {status, data}. */
export async function rest(method, path, body) {
  const res = await fetch(API + path, {
    method,
    headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  let data;
  try { data = JSON.parse(text); } catch { data = text; }
  return { status: res.status, data };
}

/** Creates a room with a unique name; resolves with its id. */
export async function newRoom(options = {}) {
  const r = await rest('POST', '/v1/rooms', { name: 'room-' + crypto.randomUUID(), options });
  assert.equal(r.status, 200, JSON.stringify(r.data));
  return r.data.id;
}

/** A participant token for the room. */
export async function token(room, user, role = 'presenter') {
  const r = await rest('POST', `/v1/rooms/${room}/tokens`, { user, role });
  assert.equal(r.status, 200, JSON.stringify(r.data));
  return r.data;
}

/** Emits a request and resolves with [status, data] from the ack. */
export function request(socket, name, data) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ack for ${name}`)), 5000);
    const ack = (status, payload) => { clearTimeout(timer); resolve([status, payload]); };
    if (data === undefined) socket.emit(name, ack); else socket.emit(name, data, ack);
  });
}

/** Resolves with cond()'s first truthy value, polling every 20 ms. */
export function waitFor(cond, what, ms = 5000) {
  return new Promise((resolve, reject) => {
    const start = Date.now();
    const tick = () => {
      const v = cond();
      if (v) return resolve(v);
      if (Date.now() - start > ms) return reject(new Error('timed out waiting for ' + what));
      setTimeout(tick, 20);
    };
    tick();
  });
}

/** Resolves with the disconnect reason ('already' if the socket is not connected). */
export function waitDisconnect(s) {
  return new Promise((resolve) => {
    if (!s.connected) return resolve('already');
    s.on('disconnect', (reason) => resolve(reason));
  });
}
