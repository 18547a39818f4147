// Unit tests of the client library's pure parts and its notification handling, with a
// fake socket standing in for socket.io (the real one is exercised by the browser tests).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConferenceClient, ConferenceError, Publication, RemoteStream, Subscription, errorCode, layerName, pickLayer, portalUrl, refreshDelay } from '../src/index.js';

const b64 = (o) => Buffer.from(JSON.stringify(o)).toString('base64');

test('portal URL comes from the token', () => {
  assert.equal(portalUrl(b64({ host: '127.0.0.1:8080', secure: false })), 'http://127.0.0.1:8080');
  assert.equal(portalUrl(b64({ host: 'meet.example.org:443', secure: true })), 'https://meet.example.org:443');
});

test('portal errors map to stable codes', () => {
  assert.equal(errorCode('unauthorized'), 'unauthorized');
  assert.equal(errorCode('Room is full'), 'room_full');
  assert.equal(errorCode('Token already used'), 'token_used');
  assert.equal(errorCode('Stream does NOT exist: x'), 'not_found');
  assert.equal(errorCode('something new'), 'server_error');
  const e = new ConferenceError('Token expired');
  assert.equal(e.code, 'token_expired');
  assert.ok(e instanceof Error);
});

test('tickets are refreshed a minute before they expire', () => {
  const now = 1_000_000;
  assert.equal(refreshDelay(b64({ notAfter: now + 600_000 }), now), 540_000);
  assert.equal(refreshDelay(b64({ notAfter: now + 30_000 }), now), 10_000);
});

function fakeSocket(answers) {
  const handlers = {};
  const sent = [];
  const socket = {
    on(ev, f) { (handlers[ev] ||= []).push(f); },
    once(ev, f) { (handlers[ev] ||= []).push(f); },
    emit(name, data, ack) {
      if (typeof data === 'function') { ack = data; data = undefined; }
      sent.push([name, data]);
      const a = answers[name];
      setTimeout(() => (a ? ack(...a(data)) : ack('error', 'Unknown request: ' + name)), 0);
    },
    close() {},
    fire(ev, data) { for (const f of handlers[ev] || []) f(data); },
  };
  return { socket, sent };
}

test('join, notifications, relogin after a reconnect, login errors', async () => {
  const ticket = b64({ participantId: 'p1', notAfter: Date.now() + 600_000 });
  const { socket, sent } = fakeSocket({
    login: () => ['ok', { id: 'p1', user: 'ann', role: 'presenter', permission: {}, room: { id: 'r', views: ['common'],
      participants: [{ id: 'p1', user: 'ann', role: 'presenter' }],
      streams: [{ id: 'r-common', type: 'mixed', media: { tracks: [{ type: 'video' }] }, info: { label: 'common' } }] },
      reconnectionTicket: ticket }],
    relogin: () => ['ok', ticket],
    text: () => ['ok'],
  });
  const client = new ConferenceClient({ io: () => { setTimeout(() => socket.fire('connect'), 0); return socket; } });
  const info = await client.join(b64({ host: 'h:1', secure: false }));
  assert.equal(info.self.id, 'p1');
  assert.deepEqual(info.remoteStreams.map((s) => [s.id, s.type, s.label]), [['r-common', 'mixed', 'common']]);

  const events = [];
  for (const e of ['participantjoined', 'participantleft', 'streamadded', 'messagereceived', 'reconnected']) client.addEventListener(e, (ev) => events.push([e, ev]));
  socket.fire('participant', { action: 'join', data: { id: 'p2', user: 'bob', role: 'viewer' } });
  socket.fire('stream', { id: 's1', status: 'add', data: { id: 's1', type: 'forward', media: { tracks: [{ type: 'audio' }, { type: 'video' }] }, info: { owner: 'p2', attributes: { a: 1 } } } });
  socket.fire('text', { from: 'p2', to: 'all', message: 'hi' });
  const s1 = client.remoteStreams.find((s) => s.id === 's1');
  assert.equal(s1.origin, 'p2');
  assert.deepEqual(s1.kinds, ['audio', 'video']);
  let updated = null;
  s1.addEventListener('updated', (e) => { updated = e; });
  socket.fire('stream', { id: 's1', status: 'update', data: { field: 'video.status', value: 'inactive' } });
  assert.equal(updated.field, 'video.status');
  assert.equal(s1.media.tracks[1].status, 'inactive');
  let ended = false;
  s1.addEventListener('ended', () => { ended = true; });
  socket.fire('stream', { id: 's1', status: 'remove' });
  assert.ok(ended);
  assert.equal(client.remoteStreams.length, 1);
  socket.fire('participant', { action: 'leave', data: 'p2' });
  assert.deepEqual(events.map((e) => e[0]).slice(0, 4), ['participantjoined', 'streamadded', 'messagereceived', 'participantleft']);
  assert.equal(events[2][1].message, 'hi');

  // The socket reconnects by itself: the client resumes with its ticket.
  socket.fire('connect');
  await new Promise((r) => setTimeout(r, 10));
  assert.deepEqual(sent.filter(([n]) => n === 'relogin'), [['relogin', ticket]]);
  assert.ok(events.some(([e]) => e === 'reconnected'));

  await client.send('yo');
  assert.deepEqual(sent.at(-1), ['text', { to: 'all', message: 'yo' }]);

  const bad = fakeSocket({ login: () => ['error', 'Room is full'] });
  const c2 = new ConferenceClient({ io: () => { setTimeout(() => bad.socket.fire('connect'), 0); return bad.socket; } });
  await assert.rejects(c2.join(b64({ host: 'h:1' })), (e) => e instanceof ConferenceError && e.code === 'room_full');
});

test('a session the server ends after it started fires error, then ended, once', async () => {
  const ticket = b64({ participantId: 'p1', notAfter: Date.now() + 600_000 });
  const { socket } = fakeSocket({
    login: () => ['ok', { id: 'p1', user: 'ann', role: 'presenter', permission: {}, room: { id: 'r', views: [], participants: [], streams: [] },
      reconnectionTicket: ticket }],
  });
  const client = new ConferenceClient({ io: () => { setTimeout(() => socket.fire('connect'), 0); return socket; } });
  await client.join(b64({ host: 'h:1', secure: false }));
  const pc = () => ({ closed: false, close() { this.closed = true; } });
  // A publication on transport t1, a subscription on its own transport t2, as _negotiate
  // leaves them once ready.
  const pub = new Publication(client, 'pub1', pc());
  client._sessions.set('pub1', { pc: pub._pc });
  client._sessions.set('t1', client._sessions.get('pub1'));
  client._publications.set('pub1', pub);
  client._watch(pub);
  const remote = new RemoteStream({ id: 's9', type: 'forward', media: { tracks: [{ type: 'video' }] }, info: { owner: 'p2' } });
  const sub = new Subscription(client, 'sub1', pc(), null, remote);
  client._sessions.set('sub1', { pc: sub._pc });
  client._watch(sub);
  const seen = [];
  for (const s of [pub, sub]) {
    s.addEventListener('error', (e) => seen.push([s.id, 'error', e.error.code, e.error.message]));
    s.addEventListener('ended', () => seen.push([s.id, 'ended']));
  }
  // The transport's error (no sessionId) ends the publication on it; the subscription goes on.
  socket.fire('progress', { id: 't1', status: 'error', data: 'webrtc node `n2` is gone' });
  socket.fire('progress', { id: 't1', status: 'error', data: 'again' });
  assert.deepEqual(seen, [['pub1', 'error', 'session_failed', 'webrtc node `n2` is gone'], ['pub1', 'ended']]);
  assert.ok(pub._pc.closed && !sub._pc.closed);
  assert.ok(!client._sessions.has('t1') && !client._sessions.has('pub1') && !client._publications.has('pub1'));
  // A session error names the subscription.
  socket.fire('progress', { id: 't2', sessionId: 'sub1', status: 'error', data: 'cut off' });
  assert.deepEqual(seen.slice(2), [['sub1', 'error', 'session_failed', 'cut off'], ['sub1', 'ended']]);
  assert.ok(sub._pc.closed);
});

test('stop() ends a session once, even when the server refuses the request', async () => {
  const ticket = b64({ participantId: 'p1', notAfter: Date.now() + 600_000 });
  const { socket, sent } = fakeSocket({
    login: () => ['ok', { id: 'p1', user: 'ann', role: 'presenter', permission: {}, room: { id: 'r', views: [], participants: [], streams: [] },
      reconnectionTicket: ticket }],
    unsubscribe: () => ['ok'],
  });
  const client = new ConferenceClient({ io: () => { setTimeout(() => socket.fire('connect'), 0); return socket; } });
  await client.join(b64({ host: 'h:1', secure: false }));
  const pc = () => ({ closed: false, close() { this.closed = true; } });
  const remote = new RemoteStream({ id: 's9', type: 'forward', media: { tracks: [{ type: 'video' }] }, info: { owner: 'p2' } });
  const sub = new Subscription(client, 'sub1', pc(), null, remote);
  // The server no longer knows the publication (it ended it already): stop() rejects with
  // its answer, and the publication has ended all the same.
  const pub = new Publication(client, 'pub1', pc());
  let ended = 0;
  for (const s of [pub, sub]) s.addEventListener('ended', () => { ended += 1; });
  await assert.rejects(pub.stop(), /Unknown request: unpublish/);
  assert.equal(ended, 1);
  assert.ok(pub._pc.closed);
  await sub.stop();
  await assert.rejects(pub.stop());
  assert.equal(ended, 2, 'once each');
  assert.deepEqual(sent.filter(([n]) => n !== 'login').map(([n, d]) => [n, d.id]), [['unpublish', 'pub1'], ['unsubscribe', 'sub1'], ['unpublish', 'pub1']]);
});

test('a subscription whose setup fails after the server made it is ended there too', async () => {
  const ticket = b64({ participantId: 'p1', notAfter: Date.now() + 600_000 });
  let fire;
  const { socket, sent } = fakeSocket({
    login: () => ['ok', { id: 'p1', user: 'ann', role: 'presenter', permission: {}, room: { id: 'r', views: [], participants: [], streams: [] },
      reconnectionTicket: ticket }],
    subscribe: () => ['ok', { id: 'sub1', transportId: 't1' }],
    // The offer is taken, then the transport fails before any answer.
    soac: () => { setTimeout(() => fire('progress', { id: 't1', status: 'error', data: 'ICE failed' }), 0); return ['ok']; },
    unsubscribe: () => ['ok'],
  });
  fire = socket.fire;
  const client = new ConferenceClient({ io: () => { setTimeout(() => socket.fire('connect'), 0); return socket; } });
  await client.join(b64({ host: 'h:1', secure: false }));
  // Just enough of a browser's peer connection and MediaStream for subscribe().
  const pcs = [];
  globalThis.RTCPeerConnection = class {
    constructor() { this.closed = false; this.iceGatheringState = 'complete'; this.transceivers = []; pcs.push(this); }
    addEventListener() {}
    addTransceiver(kind) { this.transceivers.push({ mid: String(this.transceivers.length), kind }); }
    getTransceivers() { return this.transceivers; }
    async createOffer() { return { type: 'offer', sdp: 'v=0' }; }
    async setLocalDescription(d) { this.localDescription = d; }
    close() { this.closed = true; }
  };
  globalThis.MediaStream = class { addTrack() {} };
  try {
    const remote = new RemoteStream({ id: 's9', type: 'forward', media: { tracks: [{ type: 'audio' }, { type: 'video' }] }, info: { owner: 'p2' } });
    await assert.rejects(client.subscribe(remote), (e) => e instanceof ConferenceError && e.code === 'session_failed' && /ICE failed/.test(e.message));
    assert.ok(pcs[0].closed);
    assert.ok(!client._sessions.has('sub1') && !client._sessions.has('t1'), 'forgotten');
    await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(sent.filter(([n]) => n !== 'login').map(([n, d]) => [n, d.id]), [['subscribe', undefined], ['soac', 't1'], ['unsubscribe', 'sub1']]);
  } finally {
    delete globalThis.RTCPeerConnection;
    delete globalThis.MediaStream;
  }
});

test('simulcast layers are ranked and picked by name', () => {
  const track = (rid, size) => ({ type: 'video', id: `s-video-${rid}`, rid, ...(size ? { parameters: { resolution: { width: size[0], height: size[1] } } } : {}) });
  // Listed high first, sizes known: ranked by size.
  const sized = new RemoteStream({ id: 's', type: 'forward', media: { tracks: [{ type: 'audio', id: 's-audio' }, track('f', [1280, 720]), track('h', [640, 360]), track('q', [320, 180])] } });
  assert.deepEqual(sized.kinds, ['audio', 'video']);
  assert.deepEqual(sized.layers.map((l) => l.rid), ['q', 'h', 'f']);
  assert.equal(pickLayer(sized.layers, 'low').id, 's-video-q');
  assert.equal(pickLayer(sized.layers, 'medium').rid, 'h');
  assert.equal(pickLayer(sized.layers, 'high').width, 1280);
  assert.equal(pickLayer(sized.layers, 'auto'), null);
  // A size unknown: the order the publisher listed them in.
  const listed = new RemoteStream({ id: 's', type: 'forward', media: { tracks: [track('q'), track('h', [640, 360]), track('f')] } });
  assert.deepEqual(listed.layers.map((l) => l.rid), ['q', 'h', 'f']);
  assert.throws(() => pickLayer(listed.layers, 'huge'), (e) => e.code === 'bad_request');
  const plain = new RemoteStream({ id: 'p', type: 'forward', media: { tracks: [{ type: 'video', id: 'p-video' }] } });
  assert.deepEqual(plain.layers, []);
  assert.throws(() => pickLayer(plain.layers, 'low'), (e) => e.code === 'bad_request');
  assert.equal(pickLayer(plain.layers, 'auto'), null);
  // The names currentLayer() gives back are the ones pickLayer takes.
  for (const n of [1, 2, 3, 4]) {
    const layers = Array.from({ length: n }, (_, i) => ({ rid: `r${i}` }));
    for (const name of ['low', 'medium', 'high']) {
      const at = layers.indexOf(pickLayer(layers, name));
      if (n > 2 || name !== 'medium') assert.equal(layerName(at, n), n === 1 ? 'high' : name, `${name} of ${n}`);
    }
  }
});

test('the checked-in bundle is up to date with the sources', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tessera-js-'));
  const out = join(dir, 'tessera.js');
  const root = new URL('..', import.meta.url).pathname;
  const pkg = JSON.parse(readFileSync(join(root, 'package.json'), 'utf8'));
  const args = pkg.scripts.build.replace(/^esbuild /, '').replace('dist/tessera.js', out);
  try {
    execFileSync('sh', ['-c', `node_modules/.bin/esbuild ${args}`], { cwd: root, stdio: 'pipe' });
    assert.equal(readFileSync(out, 'utf8'), readFileSync(join(root, 'dist/tessera.js'), 'utf8'), 'run `npm run build` in clients/js');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});
