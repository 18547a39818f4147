// The JS client through Tessera's embedded TURN server: two clients in Chromium may only
// use relayed candidates (iceTransportPolicy 'relay', the TURN credentials coming from the
// login result), one publishes the fake camera, the other plays it. Loopback-only
// namespace, as every browser test.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchChromium, stopServer } from './helpers.mjs';

let server;
let browser;

before(async () => {
  server = await startServer({
    config: '[webrtc]\nbind_ip = "127.0.0.1"\n[turn]\nenabled = true\nlisten_addr = "127.0.0.1:0"\nrelay_port_min = 53000\nrelay_port_max = 53999\n',
    key: 'browser-turn-key-0123456789',
  });
  browser = await launchChromium({ media: true });
});

after(async () => {
  if (browser) await browser.close();
  await stopServer(server);
});

test('relay-only clients publish and play video through the TURN server', async () => {
  const page = await browser.newPage();
  page.on('pageerror', (e) => console.error(`page error: ${e.message}`));
  await page.goto(server.portal + '/');
  const r = await page.evaluate(async () => {
    const { ConferenceClient } = await import('/sdk/tessera.js');
    const token = async (user) => (await fetch('/dev/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ user }) })).text();
    const relayOnly = { rtcConfiguration: { iceTransportPolicy: 'relay' } };
    const alice = new ConferenceClient(relayOnly);
    await alice.join(await token('alice'));
    const camera = await navigator.mediaDevices.getUserMedia({ audio: true, video: true });
    const publication = await alice.publish(camera);
    const bob = new ConferenceClient(relayOnly);
    const joined = await bob.join(await token('bob'));
    const stream = joined.remoteStreams.find((s) => s.id === publication.id);
    if (!stream) return { error: 'no stream of alice', streams: joined.remoteStreams.map((s) => s.id) };
    const subscription = await bob.subscribe(stream, { audio: false });
    const video = document.createElement('video');
    video.muted = true;
    video.srcObject = subscription.stream;
    document.body.appendChild(video);
    await video.play();
    const start = performance.now();
    while (video.videoWidth === 0 && performance.now() - start < 10000) await new Promise((r) => setTimeout(r, 100));
    const frames0 = video.getVideoPlaybackQuality().totalVideoFrames;
    await new Promise((r) => setTimeout(r, 1000));
    const frames1 = video.getVideoPlaybackQuality().totalVideoFrames;
    // The path ICE picked: both ends relayed through the TURN server.
    const stats = await subscription._pc.getStats();
    let pair;
    stats.forEach((s) => { if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId); });
    const local = pair && stats.get(pair.localCandidateId);
    return {
      turnUrls: (bob._iceServers || []).flatMap((s) => s.urls),
      width: video.videoWidth,
      frames: frames1 - frames0,
      localType: local && local.candidateType,
    };
  });
  console.log(`through TURN: ${JSON.stringify(r)}`);
  assert.ok(!r.error, JSON.stringify(r));
  assert.ok(r.turnUrls.some((u) => u.startsWith('turn:127.0.0.1:')), JSON.stringify(r));
  assert.equal(r.localType, 'relay', JSON.stringify(r));
  assert.equal(r.width, 640, JSON.stringify(r));
  assert.ok(r.frames > 5, `frames decoded in a second: ${r.frames}`);
});
