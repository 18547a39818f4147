// A page served on another origin reaches the portal, as OWT apps do: the OWT JS SDK
// starts Socket.IO with HTTP long-polling from the app's own page, so the portal must
// answer CORS. Real headless Chromium, the real socket.io-client 4 browser build, inside
// the loopback-only namespace tessera/tests/browser.rs creates.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:http';
import { readFileSync } from 'node:fs';
import { startServer as start, stopServer, launchChromium } from './helpers.mjs';

const KEY = 'cross-origin-test-key-0123456789';
const SIO = readFileSync(new URL('../node_modules/socket.io-client/dist/socket.io.min.js', import.meta.url));

let browser;
let app;
let appOrigin;
const servers = [];

async function startServer(config) {
  const s = await start({ config, key: KEY });
  servers.push(s);
  return s;
}

async function token(api) {
  const res = await fetch(`${api}/v1/rooms/dev/tokens`, {
    method: 'POST',
    headers: { Authorization: `Bearer ${KEY}`, 'Content-Type': 'application/json' },
    body: JSON.stringify({ user: 'remote-app', role: 'presenter' }),
  });
  assert.equal(res.status, 200);
  return res.text();
}

before(async () => {
  // The "application" origin: its own page and its own copy of socket.io-client.
  app = createServer((req, res) => {
    if (req.url === '/socket.io.min.js') {
      res.writeHead(200, { 'Content-Type': 'text/javascript' });
      res.end(SIO);
    } else {
      res.writeHead(200, { 'Content-Type': 'text/html' });
      res.end('<!doctype html><title>app</title><script src="/socket.io.min.js"></script>');
    }
  });
  await new Promise((r) => app.listen(0, '127.0.0.1', r));
  appOrigin = `http://127.0.0.1:${app.address().port}`;
  browser = await launchChromium();
});

after(async () => {
  if (browser) await browser.close();
  await Promise.all(servers.map(stopServer));
  if (app) app.close();
});

/** In a page of the app's origin: connect with polling first, log in, wait for the upgrade. */
async function joinFromApp(portal, tok) {
  const page = await browser.newPage();
  try {
    await page.goto(appOrigin + '/');
    assert.notEqual(new URL(portal).origin, new URL(page.url()).origin);
    return await page.evaluate(async ({ portal, tok }) => {
      const s = io(portal, { transports: ['polling', 'websocket'], reconnection: false, forceNew: true });
      // The Engine.IO handshake's transport (the upgrade may be done by `connect`).
      let opened;
      s.io.on('open', () => { opened = s.io.engine.transport.name; });
      const first = await new Promise((resolve) => {
        s.on('connect', () => resolve({ ok: true, transport: opened }));
        s.on('connect_error', (e) => resolve({ ok: false, error: String(e && e.message) }));
        setTimeout(() => resolve({ ok: false, error: 'timeout' }), 8000);
      });
      if (!first.ok) return first;
      const [status, info] = await new Promise((resolve) => s.emit('login', { token: tok, userAgent: { sdk: { version: '5.1', type: 'JavaScript' } }, protocol: '1.2' }, (...a) => resolve(a)));
      const upgraded = await new Promise((resolve) => {
        if (s.io.engine.transport.name === 'websocket') return resolve('websocket');
        s.io.engine.on('upgrade', (t) => resolve(t.name));
        setTimeout(() => resolve(s.io.engine.transport.name), 5000);
      });
      // And the JS SDK, imported as a module across origins.
      let sdk;
      try { sdk = typeof (await import(portal + '/sdk/tessera.js')).ConferenceClient; } catch (e) { sdk = 'error: ' + e.message; }
      s.close();
      return { ok: true, transport: first.transport, status, user: info && info.user, upgraded, sdk };
    }, { portal, tok });
  } finally {
    await page.close();
  }
}

test('a page on another origin joins over polling then upgrades (default: any origin)', async () => {
  const { portal, api } = await startServer('[webrtc]\nbind_ip = "127.0.0.1"\n');
  const r = await joinFromApp(portal, await token(api));
  assert.deepEqual(r, { ok: true, transport: 'polling', status: 'ok', user: 'remote-app', upgraded: 'websocket', sdk: 'function' });
});

test('an allowed origin list admits the app and refuses others', async () => {
  const allowed = await startServer(`[webrtc]\nbind_ip = "127.0.0.1"\n[portal]\ncors_origins = ["${appOrigin}"]\n`);
  const r = await joinFromApp(allowed.portal, await token(allowed.api));
  assert.equal(r.ok, true, JSON.stringify(r));
  assert.equal(r.status, 'ok');
  const other = await startServer('[webrtc]\nbind_ip = "127.0.0.1"\n[portal]\ncors_origins = ["https://app.example.com"]\n');
  const refused = await joinFromApp(other.portal, await token(other.api));
  // The browser blocks the handshake's response: socket.io reports a transport error.
  assert.equal(refused.ok, false, JSON.stringify(refused));
});
