// OWT's own JS SDK (5.1, unchanged) against Tessera in real headless Chromium: join with a
// token from the REST API, publish the fake camera and microphone, subscribe to the
// forward and the mixed stream, mute, text, unpublish, leave, as OWT's conference sample
// does, and a relogin after the connection drops. The SDK is not part of this repository
// (it is archived and not on npm): scripts/install-deps.sh --test fetches tag v5.1 of
// github.com/open-webrtc-toolkit/owt-client-javascript into target/ when GitHub is
// reachable, and tessera/tests/browser.rs points OWT_SDK_DIR at its `src/sdk`; without it
// these tests are skipped. The SDK is served unchanged, as ES modules, from an app origin
// of its own, with socket.io-client 4's browser build as its `io`.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { readFileSync, existsSync } from 'node:fs';
import { join, normalize } from 'node:path';
import { startServer, stopServer, launchChromium, sampleVideo } from './helpers.mjs';

const SDK = process.env.OWT_SDK_DIR;
const skip = SDK && existsSync(join(SDK, 'export.js')) ? false : 'OWT_SDK_DIR (the OWT JS SDK\'s src/sdk folder) is not set';
const KEY = 'owt-sdk-interop-key-0123456789ab';
const SIO = new URL('../node_modules/socket.io-client/dist/socket.io.min.js', import.meta.url);

let server;
let browser;
let app;
let appOrigin;
let room;

async function rest(method, path, body) {
  const res = await fetch(`${server.api}${path}`, {
    method,
    headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  assert.ok(res.ok, `${method} ${path}: ${res.status} ${text}`);
  return text;
}

const token = (user, role = 'presenter') => rest('POST', `/v1/rooms/${room}/tokens`, { user, role });

before(async () => {
  if (skip) return;
  server = await startServer({ config: '[webrtc]\nbind_ip = "127.0.0.1"\n', key: KEY });
  room = JSON.parse(await rest('POST', '/v1/rooms', { name: 'owt-sdk', options: {} })).id;
  app = createServer((req, res) => {
    const path = decodeURIComponent(new URL(req.url, 'http://x').pathname);
    if (path === '/socket.io.min.js') {
      res.writeHead(200, { 'Content-Type': 'text/javascript' });
      return res.end(readFileSync(SIO));
    }
    if (path.startsWith('/sdk/')) {
      const file = normalize(join(SDK, path.slice('/sdk/'.length)));
      if (!file.startsWith(normalize(SDK)) || !existsSync(file)) { res.writeHead(404); return res.end(); }
      res.writeHead(200, { 'Content-Type': 'text/javascript' });
      return res.end(readFileSync(file));
    }
    res.writeHead(200, { 'Content-Type': 'text/html' });
    res.end('<!doctype html><title>owt app</title><script src="/socket.io.min.js"></script>'
      + '<script type="module">import * as Owt from "/sdk/export.js"; window.Owt = Owt; window.owtReady = true;</script>');
  });
  await new Promise((r) => app.listen(0, '127.0.0.1', r));
  appOrigin = `http://127.0.0.1:${app.address().port}`;
  browser = await launchChromium({ media: true });
});

after(async () => {
  if (browser) await browser.close();
  if (app) app.close();
  await stopServer(server);
});

/** A page of the app's origin with the SDK loaded and, on `window`, helpers: `join(token)`
 * (a ConferenceClient that records its events in `window.events`), `remote(id)` (a remote
 * stream it knows), `watch(stream, id)` (a <video> of a MediaStream). */
async function appPage(name) {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error(`[${name}] page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' || process.env.OWT_LOG) console.error(`[${name}] console: ${m.text()}`); });
  await page.goto(appOrigin + '/');
  await page.waitForFunction(() => window.owtReady === true, null, { timeout: 10_000 });
  await page.evaluate(() => {
    window.events = [];
    // The SDK's Socket.IO client, for the relogin test to drop its transport.
    const io = window.io;
    window.sockets = [];
    window.io = (...args) => { const s = io(...args); window.sockets.push(s); return s; };
    window.join = async (tok) => {
      const client = new window.Owt.Conference.ConferenceClient();
      for (const type of ['streamadded', 'participantjoined', 'messagereceived', 'serverdisconnected']) {
        client.addEventListener(type, (e) => {
          // `published`: what OWT's basic sample reads in its `streamadded` handler
          // (`event.stream.id != publicationGlobal.id`, the publication set when publish()
          // resolved): a publisher told of its own stream first would throw there.
          window.events.push({ type, stream: e.stream && e.stream.id, from: e.origin, message: e.message, participant: e.participant && e.participant.userId, published: window.publication ? window.publication.id : null });
          if (e.stream) e.stream.addEventListener('ended', () => window.events.push({ type: 'ended', stream: e.stream.id }));
          if (e.participant) e.participant.addEventListener('left', () => window.events.push({ type: 'left', participant: e.participant.userId }));
        });
      }
      window.client = client;
      window.info = await client.join(tok);
      for (const s of window.info.remoteStreams) s.addEventListener('ended', () => window.events.push({ type: 'ended', stream: s.id }));
      for (const p of window.info.participants) p.addEventListener('left', () => window.events.push({ type: 'left', participant: p.userId }));
      return { self: window.info.self.userId, role: window.info.self.role, streams: window.info.remoteStreams.map((s) => ({ id: s.id, audio: s.source.audio, video: s.source.video })) };
    };
    window.remote = (id) => window.info.remoteStreams.find((s) => s.id === id);
    window.watch = async (stream, id) => {
      const v = document.createElement('video');
      v.id = id; v.muted = true; v.autoplay = true; v.playsInline = true;
      v.srcObject = stream;
      document.body.appendChild(v);
      await v.play().catch(() => {});
    };
  });
  return page;
}

/** Waits (20 s) for the <video id> to play a moving, non-black picture. */
async function moving(page, id, what) {
  const deadline = Date.now() + 20_000;
  let last = null;
  while (Date.now() < deadline) {
    last = await sampleVideo(page, `#${id}`);
    if (last && last.width > 0 && last.changed > 1000 && last.mean > 10) return last;
    await page.waitForTimeout(300);
  }
  assert.fail(`${what}: no moving picture (${JSON.stringify(last)})`);
}

/** Waits (10 s) for an event matching `pred` in the page's `window.events`. */
async function event(page, pred, what) {
  try {
    await page.waitForFunction(`window.events.some(${pred})`, null, { timeout: 10_000 });
  } catch {
    assert.fail(`${what}: not seen; events ${JSON.stringify(await page.evaluate(() => window.events))}`);
  }
}

/** Alice's page: joined, publishing the fake camera and microphone (`window.publication`). */
async function publisher(name, options) {
  const page = await appPage(name);
  await page.evaluate(async (tok) => window.join(tok), await token(name));
  const id = await page.evaluate(async (opts) => {
    const { Base } = window.Owt;
    const media = await Base.MediaStreamFactory.createMediaStream(new Base.StreamConstraints(
      new Base.AudioTrackConstraints(Base.AudioSourceInfo.MIC), new Base.VideoTrackConstraints(Base.VideoSourceInfo.CAMERA)));
    const local = new Base.LocalStream(media, new Base.StreamSourceInfo('mic', 'camera'), { tag: 'interop' });
    window.publication = await window.client.publish(local, opts || undefined);
    window.publication.addEventListener('error', (e) => window.events.push({ type: 'publication-error', message: String(e.error && e.error.message) }));
    return window.publication.id;
  }, options || null);
  return { page, id };
}

/** Alice publishing (`publisher`) and Bob's page joined with `role` (default presenter),
 * both closed after test `t`; `joined` is Bob's `join` result. */
async function publisherAndViewer(t, suffix, { options, role } = {}) {
  const alice = await publisher(`alice${suffix}`, options);
  const bob = await appPage(`bob${suffix}`);
  t.after(async () => { await alice.page.close(); await bob.close(); });
  const joined = await bob.evaluate(async (tok) => window.join(tok), await token(`bob${suffix}`, role));
  return { alice, bob, joined };
}

test('OWT SDK: join, publish, subscribe forward and mixed, mute, text, unpublish, leave', { skip }, async (t) => {
  const { alice, bob, joined } = await publisherAndViewer(t, '', { role: 'viewer' });
  // Alice's publish() resolved (the server's `ready`) before she heard `stream add` of her
  // own stream, as with OWT's server.
  await event(alice.page, `(e) => e.type === 'streamadded' && e.stream === ${JSON.stringify(alice.id)}`, 'alice told of her own stream');
  const own = await alice.page.evaluate((id) => window.events.find((e) => e.type === 'streamadded' && e.stream === id), alice.id);
  assert.equal(own.published, alice.id, 'publish() had resolved when the stream was added');
  assert.equal(joined.self, 'bob');
  assert.equal(joined.role, 'viewer');
  assert.ok(joined.streams.some((s) => s.id === alice.id && s.video === 'camera' && s.audio === 'mic'), JSON.stringify(joined.streams));
  const mixed = joined.streams.find((s) => s.video === 'mixed');
  assert.ok(mixed, `a mixed stream is listed: ${JSON.stringify(joined.streams)}`);

  // Forward: the stream as OWT's sample subscribes it (no options: audio and video).
  await bob.evaluate(async (id) => {
    const stream = window.remote(id);
    window.forward = await window.client.subscribe(stream);
    await window.watch(window.forward.stream, 'forward');
  }, alice.id);
  const f = await moving(bob, 'forward', 'forward stream');
  assert.ok(f.width >= 320, JSON.stringify(f));
  const tracks = await bob.evaluate(() => window.forward.stream.getTracks().map((tr) => tr.kind).sort());
  assert.deepEqual(tracks, ['audio', 'video']);

  // Mixed: the room's view at a resolution it offers.
  await bob.evaluate(async (id) => {
    const stream = window.remote(id);
    window.mixed = await window.client.subscribe(stream, { audio: true, video: true });
    await window.watch(window.mixed.stream, 'mixed');
  }, mixed.id);
  const m = await moving(bob, 'mixed', 'mixed stream');
  assert.ok(m.width > 0, JSON.stringify(m));

  // Stats through the SDK (the shared PeerConnection's report).
  const inbound = await bob.evaluate(async () => {
    const report = await window.forward.getStats();
    let bytes = 0;
    report.forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video') bytes += s.bytesReceived; });
    return bytes;
  });
  assert.ok(inbound > 10_000, `inbound video bytes ${inbound}`);

  // Mute: the room's `stream` update comes back, and the SDK fires it on the publication
  // (its subscriptions never get one: the SDK matches them by fields it never sets).
  await alice.page.evaluate(() => {
    window.publication.addEventListener('mute', (e) => window.events.push({ type: 'mute', kind: e.kind }));
    window.publication.addEventListener('unmute', (e) => window.events.push({ type: 'unmute', kind: e.kind }));
    return window.publication.mute('video');
  });
  await event(alice.page, "(e) => e.type === 'mute' && e.kind === 'video'", 'mute comes back to the publication');
  await alice.page.evaluate(() => window.publication.unmute('video'));
  await event(alice.page, "(e) => e.type === 'unmute' && e.kind === 'video'", 'unmute comes back to the publication');
  await moving(bob, 'forward', 'forward stream after unmute');

  // Text: to everyone (OWT echoes it to the sender too) and to one participant.
  await bob.evaluate(() => window.client.send('hello all'));
  await event(alice.page, "(e) => e.type === 'messagereceived' && e.message === 'hello all'", 'text to all');
  const aliceId = await alice.page.evaluate(() => window.info.self.id);
  await bob.evaluate((to) => window.client.send('just you', to), aliceId);
  await event(alice.page, "(e) => e.type === 'messagereceived' && e.message === 'just you'", 'text to one');

  // Unpublish: the subscriber's stream ends.
  await alice.page.evaluate(() => window.publication.stop());
  await event(bob, `(e) => e.type === 'ended' && e.stream === '${alice.id}'`, 'the forward stream ends');

  // Leave: the other participant sees it.
  const carol = await appPage('carol');
  t.after(() => carol.close());
  await carol.evaluate(async (tok) => window.join(tok), await token('carol'));
  await event(bob, "(e) => e.type === 'participantjoined' && e.participant === 'carol'", 'carol joins');
  await carol.evaluate(() => window.client.leave());
  await event(bob, "(e) => e.type === 'left' && e.participant === 'carol'", 'carol leaves');
});

test('OWT SDK: the same stream subscribed again plays (a new subscription, a new track)', { skip }, async (t) => {
  const { alice, bob } = await publisherAndViewer(t, '2');
  await bob.evaluate(async (id) => {
    const stream = window.remote(id);
    const first = await window.client.subscribe(stream, { audio: false, video: true });
    await window.watch(first.stream, 'first');
    window.first = first;
  }, alice.id);
  await moving(bob, 'first', 'first subscription');
  await bob.evaluate(async (id) => {
    window.first.stop();
    document.getElementById('first').remove();
    const stream = window.remote(id);
    const again = await window.client.subscribe(stream, { audio: false, video: true });
    await window.watch(again.stream, 'again');
  }, alice.id);
  await moving(bob, 'again', 'second subscription of the same stream');
});

test('OWT SDK: simulcast publish (rid encodings) and subscribe by rid', { skip }, async (t) => {
  const options = { video: [{ rid: 'q', active: true, scaleResolutionDownBy: 4 }, { rid: 'h', active: true, scaleResolutionDownBy: 2 }, { rid: 'f', active: true }] };
  const { alice, bob } = await publisherAndViewer(t, '3', { options });
  const rids = await bob.waitForFunction((id) => {
    const s = window.client && window.info.remoteStreams.find((x) => x.id === id);
    const rs = s && s.settings && s.settings.video ? s.settings.video.map((v) => v.rid).filter(Boolean) : [];
    return rs.length >= 2 ? rs : false;
  }, alice.id, { timeout: 10_000 }).then((h) => h.jsonValue()).catch(() => null);
  assert.ok(rids, 'the stream lists its layers\' rids');
  const widths = {};
  for (const rid of ['q', 'f']) {
    if (!rids.includes(rid)) continue;
    await bob.evaluate(async ({ id, rid }) => {
      const stream = window.remote(id);
      const sub = await window.client.subscribe(stream, { audio: false, video: { rid } });
      await window.watch(sub.stream, 'rid-' + rid);
    }, { id: alice.id, rid });
    widths[rid] = (await moving(bob, 'rid-' + rid, `layer ${rid}`)).width;
  }
  assert.ok(widths.q && widths.f && widths.q < widths.f, `low layer narrower than the full one: ${JSON.stringify(widths)}`);
});

test('OWT SDK: a dropped connection relogins with its ticket; media and control go on', { skip }, async (t) => {
  const { alice, bob } = await publisherAndViewer(t, '4');
  await bob.evaluate(async (id) => {
    const stream = window.remote(id);
    window.forward = await window.client.subscribe(stream, { audio: false, video: true });
    await window.watch(window.forward.stream, 'forward');
    window.connects = 0;
    window.sockets[0].on('connect', () => { window.connects += 1; });
  }, alice.id);
  await moving(bob, 'forward', 'forward stream before the drop');
  // The network goes: the transport closes under Socket.IO, which reconnects, and the SDK
  // sends `relogin` with its reconnection ticket.
  await bob.evaluate(() => window.sockets[0].io.engine.close());
  await bob.waitForFunction(() => window.connects >= 1 && window.sockets[0].connected, null, { timeout: 15_000 });
  // Control works on the new connection: text both ways, and a new subscription.
  await bob.evaluate(() => window.client.send('back'));
  await event(alice.page, "(e) => e.type === 'messagereceived' && e.message === 'back'", 'text after relogin');
  await alice.page.evaluate(() => window.client.send('welcome back'));
  await event(bob, "(e) => e.type === 'messagereceived' && e.message === 'welcome back'", 'text to the relogged participant');
  await moving(bob, 'forward', 'the subscription made before the drop');
  const events = await alice.page.evaluate(() => window.events);
  assert.ok(!events.some((e) => e.type === 'left' && e.participant === 'bob4'), `bob never left: ${JSON.stringify(events)}`);
  assert.ok(!(await bob.evaluate(() => window.events.some((e) => e.type === 'serverdisconnected'))));
});

test('OWT SDK: a mixed stream with layers, by resolution (OWT\'s sample), applyOptions and rid', { skip }, async (t) => {
  // A view with two lower layers (Tessera's `views[].video.layers`).
  const layered = JSON.parse(await rest('POST', '/v1/rooms', { name: 'owt-sdk-layers', options: { views: [{ label: 'common', video: { layers: ['x1/2', 'x1/4'] } }] } })).id;
  const tok = (user) => rest('POST', `/v1/rooms/${layered}/tokens`, { user, role: 'presenter' });
  const alice = await appPage('alice5');
  const bob = await appPage('bob5');
  t.after(async () => { await alice.close(); await bob.close(); });
  await alice.evaluate(async (tk) => window.join(tk), await tok('alice5'));
  await alice.evaluate(async () => {
    const { Base } = window.Owt;
    const media = await Base.MediaStreamFactory.createMediaStream(new Base.StreamConstraints(false, new Base.VideoTrackConstraints(Base.VideoSourceInfo.CAMERA)));
    window.publication = await window.client.publish(new Base.LocalStream(media, new Base.StreamSourceInfo(undefined, 'camera')));
  });
  await bob.evaluate(async (tk) => window.join(tk), await tok('bob5'));
  // OWT's sample makes a button per resolution in `settings.video`: one per layer here.
  const offered = await bob.evaluate(() => {
    const stream = window.info.remoteStreams.find((s) => s.source.video === 'mixed');
    return stream.settings.video.map((v) => ({ rid: v.rid, width: v.resolution.width, height: v.resolution.height }));
  });
  assert.deepEqual(offered, [{ rid: 'x1', width: 640, height: 480 }, { rid: 'x1_2', width: 320, height: 240 }, { rid: 'x1_4', width: 160, height: 120 }]);
  // By resolution, as the sample's buttons subscribe.
  await bob.evaluate(async () => {
    const stream = window.info.remoteStreams.find((s) => s.source.video === 'mixed');
    window.mixed = await window.client.subscribe(stream, { audio: true, video: { resolution: { width: 160, height: 120 } } });
    await window.watch(window.mixed.stream, 'mixed');
  });
  await moving(bob, 'mixed', 'mixed by resolution');
  // A layer's size is known from its first keyframe: until then the choice may fall on the
  // full one for a moment.
  await bob.waitForFunction(() => document.getElementById('mixed').videoWidth === 160, null, { timeout: 10_000 })
    .catch(async () => assert.fail(`by resolution: ${await bob.evaluate(() => document.getElementById('mixed').videoWidth)} wide, not 160`));
  assert.equal(await bob.evaluate(() => document.getElementById('mixed').videoHeight), 120);
  // applyOptions moves the same subscription to another layer.
  await bob.evaluate(() => window.mixed.applyOptions({ video: { resolution: { width: 640, height: 480 } } }));
  await bob.waitForFunction(() => document.getElementById('mixed').videoWidth === 640, null, { timeout: 15_000 })
    .catch(async () => assert.fail(`applyOptions: still ${await bob.evaluate(() => document.getElementById('mixed').videoWidth)} wide`));
  // And by rid.
  await bob.evaluate(async () => {
    const stream = window.info.remoteStreams.find((s) => s.source.video === 'mixed');
    const sub = await window.client.subscribe(stream, { audio: false, video: { rid: 'x1_2' } });
    await window.watch(sub.stream, 'mixed-half');
  });
  const half = await moving(bob, 'mixed-half', 'mixed layer x1_2');
  assert.deepEqual([half.width, half.height], [320, 240]);
});
