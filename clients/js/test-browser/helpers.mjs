// Shared by the browser tests: start the server binary, launch headless Chromium with
// fake media devices, join the demo page, and check that a <video> plays moving frames.
// Everything runs inside the loopback-only namespace tessera/tests/browser.rs creates.
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { chromium } from 'playwright-core';

export const BIN = process.env.TESSERA_BIN;
assert.ok(BIN, 'TESSERA_BIN must point at the tessera binary');

/** Starts `tessera serve` with a config file's text (and extra CLI arguments); resolves to
 * `{ child, portal, api }` once both listeners are up. */
export async function startServer({ config, key, args = [] }) {
  const dir = mkdtempSync(join(tmpdir(), 'tessera-browser-'));
  const cfg = join(dir, 't.toml');
  writeFileSync(cfg, config);
  const child = spawn(BIN, ['serve', '--portal-addr', '127.0.0.1:0', '--api-addr', '127.0.0.1:0', '--data-dir', join(dir, 'data'), '--config', cfg, ...args], {
    env: { ...process.env, TESSERA_SERVICE_KEY: key, RUST_LOG: process.env.SERVER_LOG || 'warn' },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  return new Promise((resolve, reject) => {
    let buf = '';
    const timer = setTimeout(() => reject(new Error('server did not start')), 30_000);
    child.stdout.on('data', (d) => {
      buf += d;
      const portal = buf.match(/portal listening on (https?:\/\/\S+)/);
      const api = buf.match(/management API listening on (https?:\/\/\S+)/);
      if (portal && api) { clearTimeout(timer); resolve({ child, dir, portal: portal[1], api: api[1] }); }
    });
    child.on('exit', (code) => reject(new Error(`server exited ${code}`)));
  });
}

/** Stops a server `startServer` started (SIGTERM, then SIGKILL after 10 s) and, once it
 * has exited, removes its config, rooms and recordings. */
export async function stopServer(server) {
  if (!server) return;
  const { child, dir } = server;
  if (child.exitCode === null && child.signalCode === null) {
    const exited = new Promise((r) => child.once('exit', r));
    child.kill('SIGTERM');
    const timer = setTimeout(() => child.kill('SIGKILL'), 10_000);
    await exited;
    clearTimeout(timer);
  }
  rmSync(dir, { recursive: true, force: true });
}

/** Headless Chromium; `media` adds the fake camera/microphone and lets WebRTC use loopback. */
export function launchChromium({ media = false, args = [] } = {}) {
  const base = ['--no-sandbox', '--disable-gpu', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--no-first-run'];
  const av = media
    ? ['--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream', '--autoplay-policy=no-user-gesture-required',
      // Loopback is the only interface in the test's network namespace; Chromium skips it
      // when gathering unless told otherwise.
      '--allow-loopback-in-peer-connection']
    : [];
  return chromium.launch({ executablePath: process.env.CHROMIUM || '/usr/bin/chromium', args: [...base, ...av, ...args] });
}

/** Opens the demo page (in a browser or a browser context) and joins as `user`; resolves once it shows "In room". */
export async function openPage(target, portal, user, role = 'presenter') {
  // A browser makes a page in a fresh context of its own; a context (made by the caller with its options) makes one in itself.
  const page = 'newContext' in target ? await target.newPage({ viewport: { width: 1100, height: 800 } }) : await target.newPage();
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
export async function sampleVideo(page, selector) {
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

/** Waits (20 s) until `selector` plays a moving, non-black picture; fails with the page's state. */
export async function waitVideo(page, selector, what) {
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
