// The demo page and the JS client in real headless Chromium with fake camera and
// microphone, against the real server. Run inside a network namespace holding only
// loopback (tessera/tests/browser.rs does that), so media never leaves 127.0.0.1.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, writeFileSync, mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

const BIN = process.env.TESSERA_BIN;
const SHOT = process.env.TESSERA_SCREENSHOT || join(process.cwd(), 'demo-screenshot.png');
assert.ok(BIN, 'TESSERA_BIN must point at the tessera binary');

let server;
let portal;
let browser;

async function startServer() {
  const dir = mkdtempSync(join(tmpdir(), 'tessera-browser-'));
  const cfg = join(dir, 't.toml');
  writeFileSync(cfg, '[webrtc]\nbind_ip = "127.0.0.1"\n[portal]\nreconnection_timeout_secs = 5\n');
  const child = spawn(BIN, ['serve', '--portal-addr', '127.0.0.1:0', '--api-addr', '127.0.0.1:0', '--data-dir', join(dir, 'data'), '--config', cfg], {
    env: { ...process.env, TESSERA_SERVICE_KEY: 'browser-test-key-0123456789', RUST_LOG: process.env.SERVER_LOG || 'warn' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const url = await new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error('server did not start')), 30_000);
    child.stdout.on('data', (d) => {
      buf += d;
      const m = buf.match(/portal listening on (http:\/\/\S+)/);
      if (m) { clearTimeout(timer); resolve(m[1]); }
    });
    child.on('exit', (code) => reject(new Error(`server exited ${code}`)));
  });
  return { child, url };
}

before(async () => {
  ({ child: server, url: portal } = await startServer());
  browser = await chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    args: ['--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream', '--no-sandbox', '--disable-gpu',
      '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run',
      '--autoplay-policy=no-user-gesture-required',
      // Loopback is the only interface in the test's network namespace; Chromium skips it
      // when gathering unless told otherwise.
      '--allow-loopback-in-peer-connection'],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (server) server.kill('SIGTERM');
});

async function openPage(user, role = 'presenter') {
  const page = await browser.newPage({ viewport: { width: 1100, height: 800 } });
  page.on('pageerror', (e) => console.error(`[${user}] page error: ${e.message}`));
  page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') console.error(`[${user}] console: ${m.text()}`); });
  await page.goto(portal);
  await page.fill('#user', user);
  await page.selectOption('#role', role);
  await page.click('#join');
  await page.waitForFunction(() => /In room/.test(document.getElementById('status').textContent), null, { timeout: 15_000 });
  return page;
}

/** Two canvas samples of a video, some time apart: size, mean brightness, whether it changed. */
async function sampleVideo(page, selector) {
  return page.evaluate(async (sel) => {
    const v = document.querySelector(sel);
    if (!v || !v.videoWidth) return null;
    const c = document.createElement('canvas');
    c.width = 160; c.height = 120;
    const ctx = c.getContext('2d');
    const grab = () => { ctx.drawImage(v, 0, 0, 160, 120); return ctx.getImageData(0, 0, 160, 120).data; };
    const a = grab();
    await new Promise((r) => setTimeout(r, 700));
    const b = grab();
    let diff = 0, sum = 0;
    for (let i = 0; i < a.length; i += 4) { diff += Math.abs(a[i] - b[i]) + Math.abs(a[i + 1] - b[i + 1]); sum += b[i] + b[i + 1] + b[i + 2]; }
    return { width: v.videoWidth, height: v.videoHeight, changed: diff, mean: sum / (a.length / 4) / 3 };
  }, selector);
}

async function waitVideo(page, selector, what) {
  const deadline = Date.now() + 20_000;
  let last = null;
  while (Date.now() < deadline) {
    last = await sampleVideo(page, selector);
    if (last && last.width > 0 && last.changed > 1000 && last.mean > 10) return last;
    await page.waitForTimeout(300);
  }
  const state = await page.evaluate(() => ({
    error: document.getElementById('error').textContent,
    status: document.getElementById('status').textContent,
    tiles: document.querySelectorAll('.tile.remote').length,
    streams: window.tesseraClient ? window.tesseraClient.remoteStreams.map((s) => `${s.type}:${s.id}`) : [],
  }));
  assert.fail(`${what}: no moving picture (${JSON.stringify(last)}; page ${JSON.stringify(state)})`);
}

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
