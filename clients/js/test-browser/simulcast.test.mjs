// Simulcast from a real browser: the JS client publishes Chromium's fake camera at
// 1280x720 as three layers (`simulcast: true`); another client subscribes to the low
// layer, then switches to high and medium, and the picture size it decodes follows. And
// in a room with no views (nothing mixes), layers nobody takes stop being encoded and sent
// by the browser until someone wants them. Loopback-only namespace, as every browser test.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchChromium } from './helpers.mjs';

const KEY = 'browser-simulcast-key-0123456789';
let server;
let browser;

async function rest(path, body) {
  const res = await fetch(`${server.api}${path}`, { method: 'POST', headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' }, body: JSON.stringify(body) });
  assert.equal(res.status, 200, `${path}: ${await res.clone().text()}`);
  return res;
}

before(async () => {
  server = await startServer({ config: '[webrtc]\nbind_ip = "127.0.0.1"\n', key: KEY });
  browser = await launchChromium({ media: true });
});

after(async () => {
  if (browser) await browser.close();
  if (server) server.child.kill('SIGTERM');
});

test('a simulcast publication plays in the layer the subscriber chooses', async () => {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  await page.goto(server.portal + '/');
  const r = await page.evaluate(async () => {
    const { ConferenceClient } = await import('/sdk/tessera.js');
    const token = async (user) => (await fetch('/dev/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user }) })).text();
    const alice = new ConferenceClient();
    await alice.join(await token('alice'));
    const camera = await navigator.mediaDevices.getUserMedia({ audio: false, video: { width: 1280, height: 720 } });
    const publication = await alice.publish(camera, { simulcast: true });
    const bob = new ConferenceClient();
    const joined = await bob.join(await token('bob'));
    const stream = joined.remoteStreams.find((s) => s.id === publication.id);
    if (!stream) return { error: 'no stream of alice' };
    const subscription = await bob.subscribe(stream, { layer: 'low' });
    const video = document.createElement('video');
    video.muted = true;
    video.srcObject = subscription.stream;
    document.body.appendChild(video);
    await video.play();
    // The width the video settles on (the same for a second), within `ms`.
    const settle = async (want, ms) => {
      const start = performance.now();
      let last = 0, since = performance.now();
      while (performance.now() - start < ms) {
        await new Promise((res) => setTimeout(res, 100));
        if (video.videoWidth !== last) { last = video.videoWidth; since = performance.now(); }
        if (last === want && performance.now() - since > 1000) break;
      }
      return { width: last, after: Math.round(performance.now() - start) };
    };
    const low = await settle(320, 10000);
    await subscription.setLayer('high');
    const high = await settle(1280, 15000);
    await subscription.setLayer('medium');
    const medium = await settle(640, 10000);
    const frames0 = video.getVideoPlaybackQuality().totalVideoFrames;
    await new Promise((res) => setTimeout(res, 1000));
    const frames = video.getVideoPlaybackQuality().totalVideoFrames - frames0;
    return { layers: stream.layers.map((l) => l.rid), ids: stream.layers.map((l) => l.id), id: stream.id, low, high, medium, frames, layer: subscription.layer };
  });
  console.log(`simulcast in Chromium: ${JSON.stringify(r)}`);
  assert.ok(!r.error, JSON.stringify(r));
  assert.deepEqual(r.layers, ['q', 'h', 'f']);
  assert.deepEqual(r.ids, ['q', 'h', 'f'].map((rid) => `${r.id}-video-${rid}`));
  assert.equal(r.low.width, 320, JSON.stringify(r));
  assert.equal(r.high.width, 1280, JSON.stringify(r));
  assert.equal(r.medium.width, 640, JSON.stringify(r));
  assert.equal(r.layer, 'medium');
  assert.ok(r.frames > 5, `frames decoded in a second on the medium layer: ${r.frames}`);
});

test('layers nobody takes are paused in the publishing browser', async () => {
  const room = (await (await rest('/v1/rooms', { name: 'no-views', options: { views: [] } })).json()).id;
  const token = async (user) => (await rest(`/v1/rooms/${room}/tokens`, { user, role: 'presenter' })).text();
  const tokens = { alice: await token('alice'), bob: await token('bob') };
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  await page.goto(server.portal + '/');
  const r = await page.evaluate(async (tokens) => {
    const { ConferenceClient } = await import('/sdk/tessera.js');
    const wait = async (what, ms, cond) => {
      const start = performance.now();
      while (!(await cond())) {
        if (performance.now() - start > ms) throw new Error(`no ${what} within ${ms} ms`);
        await new Promise((res) => setTimeout(res, 100));
      }
      return Math.round(performance.now() - start);
    };
    // Bytes the browser sent per layer over a second.
    const sending = async (pc) => {
      const read = async () => {
        const out = {};
        (await pc.getStats()).forEach((s) => { if (s.type === 'outbound-rtp' && s.kind === 'video') out[s.rid] = s.bytesSent; });
        return out;
      };
      const a = await read();
      await new Promise((res) => setTimeout(res, 1000));
      const b = await read();
      return Object.fromEntries(Object.keys(b).map((rid) => [rid, b[rid] - (a[rid] || 0)]));
    };
    const alice = new ConferenceClient();
    await alice.join(tokens.alice);
    const camera = await navigator.mediaDevices.getUserMedia({ audio: false, video: { width: 1280, height: 720 } });
    const publication = await alice.publish(camera, { simulcast: true });
    const pc = publication._pc;
    const pausedIn = await wait('[q] alone', 5000, () => JSON.stringify(publication.activeLayers) === '["q"]');
    // The browser reconfigures its encoder (slower on a loaded machine): a second in which
    // it sends q alone, within 8 s.
    let alone = null;
    const quietIn = await wait('q alone on the wire', 8000, async () => {
      alone = await sending(pc);
      return alone.q > 1000 && (alone.h || 0) < 300 && (alone.f || 0) < 300;
    }).catch((e) => e.message);
    const bob = new ConferenceClient();
    const joined = await bob.join(tokens.bob);
    const stream = joined.remoteStreams.find((s) => s.id === publication.id);
    await bob.subscribe(stream, { audio: false, layer: 'high' });
    const resumedIn = await wait('all layers', 5000, () => JSON.stringify(publication.activeLayers) === '["q","h","f"]');
    await new Promise((res) => setTimeout(res, 1000));
    const watched = await sending(pc);
    return { pausedIn, quietIn, alone, resumedIn, watched };
  }, tokens);
  console.log(`dynacast in Chromium: ${JSON.stringify(r)}`);
  assert.ok(r.alone.q > 1000, `q is sent while alone: ${JSON.stringify(r)}`);
  assert.ok((r.alone.h || 0) < 300 && (r.alone.f || 0) < 300, `h and f paused while alone: ${JSON.stringify(r)}`);
  assert.ok(r.watched.f > 5000 && r.watched.h > 1000, `h and f sent again once watched: ${JSON.stringify(r)}`);
});
