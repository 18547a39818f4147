// The demo page and the JS client in real headless Chromium with fake camera and
// microphone, against the real server. Run inside a network namespace holding only
// loopback (tessera/tests/browser.rs does that), so media never leaves 127.0.0.1.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { startServer, launchChromium, openPage as openDemoPage, waitVideo, stopServer } from './helpers.mjs';

const SHOT = process.env.TESSERA_SCREENSHOT || join(process.cwd(), 'demo-screenshot.png');

let server;
let browser;

before(async () => {
  server = await startServer({ config: '[webrtc]\nbind_ip = "127.0.0.1"\n[portal]\nreconnection_timeout_secs = 5\n', key: 'browser-test-key-0123456789' });
  browser = await launchChromium({ media: true });
});

after(async () => {
  if (browser) await browser.close();
  await stopServer(server);
});

const openPage = (user, role) => openDemoPage(browser, server.portal, user, role);

test('two participants see each other, the mix, chat, and survive a network drop', async () => {
  const alice = await openPage('alice');
  await alice.click('#publish');
  const bob = await openPage('bob');
  await bob.click('#publish');

  // Each plays the other's forward stream and the mixed stream, with frames advancing.
  const a = await waitVideo(alice, '.tile.remote video', "alice sees bob");
  const b = await waitVideo(bob, '.tile.remote video', "bob sees alice");
  assert.equal(a.width, 640);
  assert.ok(b.width > 0);
  const am = await waitVideo(alice, '#mixed', 'alice sees the mix');
  await waitVideo(bob, '#mixed', 'bob sees the mix');
  assert.equal(am.width, 640);
  console.log(`forward ${a.width}x${a.height} changed=${a.changed} mean=${a.mean.toFixed(1)}; mixed ${am.width}x${am.height} changed=${am.changed}`);

  // Chat.
  await bob.fill('#chat', 'hello from bob');
  await bob.click('#chat-form button');
  await alice.waitForFunction(() => document.getElementById('messages').textContent.includes('bob: hello from bob'), null, { timeout: 5000 });
  // The server sends a message to everyone back to its sender too (as OWT does): bob's
  // page shows it once, as his own (the echo left with alice's copy).
  await new Promise((r) => setTimeout(r, 300));
  const bobs = await bob.evaluate(() => document.getElementById('messages').textContent);
  assert.equal(bobs.split('hello from bob').length - 1, 1, bobs);
  assert.ok(bobs.includes('me: hello from bob'), bobs);

  // Bob's network drops; socket.io reconnects and the client relogs in. Alice sees no leave.
  const leaves = await alice.evaluate(() => { window.__leaves = 0; window.tesseraClient.addEventListener('participantleft', () => window.__leaves++); return 0; });
  await bob.evaluate(() => { window.__reconnected = false; window.tesseraClient.addEventListener('reconnected', () => { window.__reconnected = true; }); window.tesseraClient._socket.io.engine.close(); });
  await bob.waitForFunction(() => window.__reconnected === true, null, { timeout: 15_000 });
  await alice.waitForTimeout(1000);
  assert.equal(await alice.evaluate(() => window.__leaves), leaves);
  assert.match(await alice.textContent('#people'), /bob/);
  await waitVideo(alice, '.tile.remote video', 'bob still playing after his reconnection');
  await bob.fill('#chat', 'back again');
  await bob.click('#chat-form button');
  await alice.waitForFunction(() => document.getElementById('messages').textContent.includes('bob: back again'), null, { timeout: 5000 });

  // Switch the mixed view to the lecture layout: everyone is told of the new layout.
  const before = await alice.evaluate(() => window.tesseraClient.remoteStreams.find((s) => s.type === 'mixed').info.layout.length);
  await alice.selectOption('#layout', 'lecture');
  await bob.waitForFunction((n) => {
    const m = window.tesseraClient.remoteStreams.find((s) => s.type === 'mixed');
    return m && m.info.layout.length !== n && m.info.layout.length === 6;
  }, before, { timeout: 5000 });
  await waitVideo(alice, '#mixed', 'the mix after the layout change');

  mkdirSync(join(SHOT, '..'), { recursive: true });
  await alice.screenshot({ path: SHOT, fullPage: true });
  await bob.close();
  await alice.close();
});

test('a viewer cannot publish and is told why', async () => {
  const viewer = await openPage('vic', 'viewer');
  await viewer.click('#publish');
  await viewer.waitForFunction(() => !document.getElementById('error').hidden, null, { timeout: 15_000 });
  assert.match(await viewer.textContent('#error'), /\[unauthorized\]/);
  await viewer.close();
});
