// Simulcast from a real browser: the JS client publishes Chromium's fake camera at
// 1280x720 as three layers (`simulcast: true`); another client subscribes to the low
// layer, then switches to high and medium, and the picture size it decodes follows (and
// `currentLayer()` names it); off screen (`pauseWhenHidden`) its video stops. And
// in a room with no views (nothing mixes), layers nobody takes stop being encoded and sent
// by the browser until someone wants them. And two subscribers on `auto`, one of them
// behind a throttled link (tc on what the server sends to its port): it moves to a lower
// layer while the other stays on the top one. And a publisher whose uplink loses 10 % of
// its packets (nftables): each layer is repaired over its own RTX flow (named by its repaired RID),
// which the server restores to the layer. Loopback-only namespace, as every browser test.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { startServer, launchChromium, stopServer } from './helpers.mjs';

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
  await stopServer(server);
});

/** A portal page with `token(user)` (a dev-room token) and `publishCamera()` (Alice joins
 * and publishes the fake 1280x720 camera with simulcast; resolves to the publication) on `window`. */
async function portalPage() {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  await page.goto(server.portal + '/');
  await page.evaluate(() => {
    window.token = async (user) => (await fetch('/dev/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user }) })).text();
    window.publishCamera = async () => {
      const { ConferenceClient } = await import('/sdk/tessera.js');
      const alice = new ConferenceClient();
      await alice.join(await window.token('alice'));
      const camera = await navigator.mediaDevices.getUserMedia({ audio: false, video: { width: 1280, height: 720 } });
      return alice.publish(camera, { simulcast: true });
    };
    // `user` joins and subscribes to `publication` with `options`, playing it in a new
    // <video>: resolves to { stream, subscription, video }.
    window.watch = async (user, publication, options) => {
      const { ConferenceClient } = await import('/sdk/tessera.js');
      const client = new ConferenceClient();
      const joined = await client.join(await window.token(user));
      const stream = joined.remoteStreams.find((s) => s.id === publication.id);
      if (!stream) throw new Error(`${user} sees no stream ${publication.id}`);
      const subscription = await client.subscribe(stream, options);
      const video = document.createElement('video');
      video.muted = true;
      video.srcObject = subscription.stream;
      document.body.appendChild(video);
      await video.play();
      return { stream, subscription, video };
    };
    // The local port of a connection's selected candidate pair.
    window.localPort = async (pc) => {
      let port = null;
      const stats = await pc.getStats();
      stats.forEach((s) => {
        if (s.type === 'transport' && s.selectedCandidatePairId) {
          const pair = stats.get(s.selectedCandidatePairId);
          port = pair && stats.get(pair.localCandidateId)?.port;
        }
      });
      return port;
    };
  });
  return page;
}

test('a simulcast publication plays in the layer the subscriber chooses', async (t) => {
  const page = await portalPage();
  // Closed after: its publisher and subscriber would load the CPU of the tests after.
  t.after(() => page.close());
  const r = await page.evaluate(async () => {
    const publication = await window.publishCamera();
    const { stream, subscription, video } = await window.watch('bob', publication, { layer: 'low' });
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
    const current = async () => (await subscription.currentLayer())?.name;
    const low = await settle(320, 10000);
    low.current = await current();
    await subscription.setLayer('high');
    const high = await settle(1280, 15000);
    high.current = await current();
    await subscription.setLayer('medium');
    const medium = await settle(640, 10000);
    medium.current = await current();
    const sleep = (ms) => new Promise((res) => setTimeout(res, ms));
    const frames0 = video.getVideoPlaybackQuality().totalVideoFrames;
    await sleep(1000);
    const frames = video.getVideoPlaybackQuality().totalVideoFrames - frames0;
    // Off screen: the video stops coming (no bytes); back on screen, it plays again.
    const bytes = async () => {
      let n = 0;
      (await subscription._pc.getStats()).forEach((s) => { if (s.type === 'inbound-rtp' && s.kind === 'video') n = s.bytesReceived; });
      return n;
    };
    const stopWatching = subscription.pauseWhenHidden(video);
    video.style.position = 'absolute';
    video.style.top = '10000px';
    await sleep(1500);
    const hiddenFrom = await bytes();
    await sleep(1000);
    const hiddenBytes = (await bytes()) - hiddenFrom;
    video.style.top = '0px';
    const shownAt = performance.now();
    const shownFrames = video.getVideoPlaybackQuality().totalVideoFrames;
    while (video.getVideoPlaybackQuality().totalVideoFrames < shownFrames + 5 && performance.now() - shownAt < 5000) await sleep(100);
    const backAfter = Math.round(performance.now() - shownAt);
    const framesBack = video.getVideoPlaybackQuality().totalVideoFrames - shownFrames;
    stopWatching();
    return { layers: stream.layers.map((l) => l.rid), ids: stream.layers.map((l) => l.id), id: stream.id, low, high, medium, frames, layer: subscription.layer, hiddenBytes, backAfter, framesBack };
  });
  console.log(`simulcast in Chromium: ${JSON.stringify(r)}`);
  assert.ok(!r.error, JSON.stringify(r));
  assert.deepEqual(r.layers, ['q', 'h', 'f']);
  assert.deepEqual(r.ids, ['q', 'h', 'f'].map((rid) => `${r.id}-video-${rid}`));
  assert.equal(r.low.width, 320, JSON.stringify(r));
  assert.equal(r.high.width, 1280, JSON.stringify(r));
  assert.equal(r.medium.width, 640, JSON.stringify(r));
  assert.equal(r.layer, 'medium');
  assert.deepEqual([r.low.current, r.high.current, r.medium.current], ['low', 'high', 'medium'], 'currentLayer()');
  assert.ok(r.frames > 5, `frames decoded in a second on the medium layer: ${r.frames}`);
  // pauseWhenHidden: nothing but a stray packet off screen; frames again once shown.
  assert.ok(r.hiddenBytes < 2000, `video bytes received in a second off screen: ${r.hiddenBytes}`);
  assert.ok(r.framesBack >= 5, `frames after coming back on screen: ${r.framesBack} in ${r.backAfter} ms`);
});

test('layers nobody takes are paused in the publishing browser', async (t) => {
  const room = (await (await rest('/v1/rooms', { name: 'no-views', options: { views: [] } })).json()).id;
  const token = async (user) => (await rest(`/v1/rooms/${room}/tokens`, { user, role: 'presenter' })).text();
  const tokens = { alice: await token('alice'), bob: await token('bob') };
  const page = await browser.newPage();
  t.after(() => page.close());
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

test('a subscriber on a throttled link gets a lower layer while another keeps the top one', async (t) => {
  const page = await portalPage();
  t.after(() => page.close());
  // Alice publishes; Bob and Carl subscribe on auto, each on a connection of its own.
  const port = await page.evaluate(async () => {
    const publication = await window.publishCamera();
    const watch = (user) => window.watch(user, publication, { audio: false });
    window.viewers = { bob: await watch('bob'), carl: await watch('carl') };
    // Both start on the top layer.
    const start = performance.now();
    while (performance.now() - start < 15000) {
      if (window.viewers.bob.video.videoWidth === 1280 && window.viewers.carl.video.videoWidth === 1280) break;
      await new Promise((res) => setTimeout(res, 100));
    }
    if (window.viewers.carl.video.videoWidth !== 1280 || window.viewers.bob.video.videoWidth !== 1280) {
      return { unmeasurable: `not both on the top layer before the limit: bob ${window.viewers.bob.video.videoWidth}, carl ${window.viewers.carl.video.videoWidth}` };
    }
    // Carl's local port: what the server sends to.
    const port = await window.localPort(window.viewers.carl.subscription._pc);
    return { port };
  });
  // A loaded machine (CI) may have Chromium scale its top layer down (CPU adaptation) or
  // the server see delay before any limit: then there is no top layer to stay on, and
  // nothing this test can tell. Said, not hidden.
  if (port.unmeasurable) {
    console.log(`throttled subscriber: not measured: ${port.unmeasurable}`);
    t.skip(port.unmeasurable);
    return;
  }
  assert.ok(port.port, 'no selected candidate pair for carl');
  // What the server sends to Carl's port: 450 kbit/s behind a 64-packet queue, a
  // one-packet burst (Chromium's fake camera: h about 300 kbit/s fits, f about 800 does not).
  const tc = (args) => execFileSync('tc', args.split(' '));
  tc('qdisc add dev lo root handle 1: htb default 1');
  try {
    tc('class add dev lo parent 1: classid 1:1 htb rate 100gbit');
    tc('class add dev lo parent 1: classid 1:10 htb rate 450kbit ceil 450kbit burst 1600b cburst 1600b');
    tc('qdisc add dev lo parent 1:10 pfifo limit 64');
    tc(`filter add dev lo parent 1: protocol ip u32 match ip protocol 17 0xff match ip dport ${port.port} 0xffff flowid 1:10`);
    const r = await page.evaluate(async () => {
      const { bob, carl } = window.viewers;
      // Carl below the top layer within 15 s; then both sampled every 250 ms for 8 s.
      const start = performance.now();
      while (carl.video.videoWidth === 1280 && performance.now() - start < 15000) await new Promise((res) => setTimeout(res, 100));
      const down = Math.round(performance.now() - start);
      const widths = { bob: [], carl: [] };
      for (let i = 0; i < 32; i++) {
        await new Promise((res) => setTimeout(res, 250));
        widths.bob.push(bob.video.videoWidth);
        widths.carl.push(carl.video.videoWidth);
      }
      const frames = (v) => v.getVideoPlaybackQuality().totalVideoFrames;
      const before = { bob: frames(bob.video), carl: frames(carl.video) };
      await new Promise((res) => setTimeout(res, 1000));
      return { down, widths, fps: { bob: frames(bob.video) - before.bob, carl: frames(carl.video) - before.carl } };
    });
    const share = (list, test) => list.filter(test).length / list.length;
    console.log(`throttled subscriber in Chromium: carl below the top layer after ${r.down} ms; ${JSON.stringify(r)}`);
    assert.ok(r.down < 15000, `carl never left the top layer: ${JSON.stringify(r)}`);
    assert.ok(share(r.widths.carl, (w) => w > 0 && w < 1280) >= 0.7, `carl below the top layer for less than 70 % of the time: ${JSON.stringify(r.widths.carl)}`);
    assert.ok(share(r.widths.bob, (w) => w === 1280) >= 0.9, `bob not on the top layer: ${JSON.stringify(r.widths.bob)}`);
    assert.ok(r.fps.carl > 5 && r.fps.bob > 5, `frames decoded in a second: ${JSON.stringify(r.fps)}`);
  } finally {
    try { tc('qdisc del dev lo root'); } catch (e) { console.error(`removing the shaping: ${e.message}`); }
  }
});

test('a simulcast publication that loses packets is repaired over each layer\'s RTX', async (t) => {
  const page = await portalPage();
  t.after(() => page.close());
  // Alice publishes; Bob watches the top layer; Alice's local port is what loses packets.
  const port = await page.evaluate(async () => {
    const publication = await window.publishCamera();
    const { subscription, video } = await window.watch('bob', publication, { audio: false, layer: 'high' });
    window.lossy = { publication, subscription, video };
    const start = performance.now();
    while (video.videoWidth === 0 && performance.now() - start < 10000) await new Promise((res) => setTimeout(res, 100));
    return window.localPort(publication._pc);
  });
  assert.ok(port, 'no selected candidate pair for alice');
  const metric = async (name) => {
    const text = await (await fetch(`${server.api}/metrics`)).text();
    const line = text.split('\n').find((l) => l.startsWith(`${name} `));
    return line ? Number(line.split(' ')[1]) : 0;
  };
  const repairs = () => metric('tessera_rtx_repairs_total');
  const nacksBefore = await metric('tessera_nacks_sent_total');
  const before = await repairs();
  // 10 % of what Alice sends (all three layers, their RTX, her RTCP), at random, is dropped
  // on its way (nftables: this kernel may have no netem).
  const nft = (...args) => execFileSync('nft', args);
  nft('add', 'table', 'inet', 'lossy');
  let r;
  let dropped;
  try {
    nft('add', 'chain', 'inet', 'lossy', 'out', '{ type filter hook output priority 0; policy accept; }');
    nft('add', 'rule', 'inet', 'lossy', 'out', 'udp', 'sport', String(port), 'numgen', 'random', 'mod', '100', '<', '10', 'counter', 'drop');
    r = await page.evaluate(async () => {
      const { publication, subscription } = window.lossy;
      const inbound = async () => {
        let found = null;
        (await subscription._pc.getStats()).forEach((s) => {
          if (s.type === 'inbound-rtp' && s.kind === 'video') found = { lost: s.packetsLost, received: s.packetsReceived, frames: s.framesDecoded };
        });
        return found;
      };
      const start = await inbound();
      await new Promise((res) => setTimeout(res, 6000));
      const end = await inbound();
      const layers = {};
      (await publication._pc.getStats()).forEach((s) => {
        if (s.type === 'outbound-rtp' && s.kind === 'video') {
          layers[s.rid] = { rtxSsrc: s.rtxSsrc, sent: s.packetsSent, resent: s.retransmittedPacketsSent, nacks: s.nackCount };
        }
      });
      return { layers, lost: end.lost - start.lost, received: end.received - start.received, frames: end.frames - start.frames };
    });
    dropped = execFileSync('nft', ['list', 'ruleset']).toString().match(/counter packets (\d+)/)?.[1];
  } finally {
    try { nft('delete', 'table', 'inet', 'lossy'); } catch (e) { console.error(`removing the loss: ${e.message}`); }
  }
  const restored = (await repairs()) - before;
  const nacks = (await metric('tessera_nacks_sent_total')) - nacksBefore;
  console.log(`simulcast over a lossy uplink in Chromium: ${dropped} packets dropped, ${nacks} NACKs sent, ${restored} RTX packets restored; ${JSON.stringify(r)}`);
  for (const rid of ['q', 'h', 'f']) {
    assert.ok(r.layers[rid], `no outbound-rtp for layer ${rid}: ${JSON.stringify(r.layers)}`);
    assert.ok(r.layers[rid].rtxSsrc, `layer ${rid} has no RTX flow: ${JSON.stringify(r.layers)}`);
  }
  // Chromium also resends recent packets over RTX unasked, as padding when it probes, and
  // those (most of what it resends here) are not in `retransmittedPacketsSent`: the
  // server's count of what it restored is the measure.
  assert.ok(restored > 0, `the server restored no retransmission: ${JSON.stringify(r.layers)}`);
  // Without the repairs Bob would lose what the uplink lost (~10 %).
  assert.ok(r.received > 100 && r.frames > 60, `bob's video did not flow: ${JSON.stringify(r)}`);
  assert.ok(r.lost <= r.received * 0.005, `bob lost ${r.lost} of ${r.received} packets: ${JSON.stringify(r)}`);
});
