// The demo over https/wss: `tessera serve --dev-tls` makes a self-signed certificate, and
// Chromium (told to accept it, as a user clicking through the warning would) joins,
// publishes and plays another participant's video through the TLS portal.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchChromium, openPage, waitVideo, stopServer } from './helpers.mjs';

let server;
let browser;

before(async () => {
  server = await startServer({ config: '[webrtc]\nbind_ip = "127.0.0.1"\n', key: 'browser-tls-key-0123456789', args: ['--dev-tls'] });
  browser = await launchChromium({ media: true, args: ['--ignore-certificate-errors'] });
});

after(async () => {
  if (browser) await browser.close();
  await stopServer(server);
});

test('the demo page joins over https and wss and plays video', async () => {
  assert.match(server.portal, /^https:\/\//);
  const alice = await openPage(browser, server.portal, 'alice');
  // The page is a secure context (the camera needs one off localhost) and the token sends
  // the client to the TLS portal.
  assert.equal(await alice.evaluate(() => window.isSecureContext && location.protocol), 'https:');
  // Socket.IO may still be upgrading from polling when the page says "In room" (seen
  // once in CI): the upgrade to wss must be done within 5 s.
  await alice.waitForFunction(() => window.tesseraClient._socket.io.engine.transport.name === 'websocket', null, { timeout: 5000 }).catch(() => {});
  const transport = await alice.evaluate(() => window.tesseraClient._socket.io.engine.transport.name);
  assert.equal(transport, 'websocket');
  assert.match(await alice.evaluate(() => window.tesseraClient._socket.io.uri), /^https:\/\//);
  await alice.click('#publish');
  const bob = await openPage(browser, server.portal, 'bob');
  const seen = await waitVideo(bob, '.tile.remote video', 'bob sees alice over the TLS portal');
  assert.equal(seen.width, 640);
  console.log(`over TLS: ${seen.width}x${seen.height} changed=${seen.changed}`);
});
