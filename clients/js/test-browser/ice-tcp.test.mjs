// ICE over TCP: in a network namespace where every UDP packet is dropped (as behind a
// firewall that blocks UDP), a browser still publishes and plays, over the workers
// engine's passive TCP candidate; the selected candidate pair on both pages is TCP.
// tessera/tests/browser.rs runs this file alone in such a namespace and sets
// TESSERA_UDP_BLOCKED=1; anywhere else it is skipped.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startServer, launchChromium, openPage, waitVideo, stopServer } from './helpers.mjs';

let server;
let browser;

before(async () => {
  if (process.env.TESSERA_UDP_BLOCKED !== '1') return;
  server = await startServer({ config: '[webrtc]\nbind_ip = "127.0.0.1"\n', key: 'ice-tcp-test-key-0123456789' });
  browser = await launchChromium({ media: true });
});

after(async () => {
  if (browser) await browser.close();
  await stopServer(server);
});

/** The transport protocols of the page's connected candidate pairs (local candidate). */
async function selectedProtocols(page) {
  return page.evaluate(async () => {
    const out = [];
    for (const pc of window.__pcs) {
      if (pc.connectionState !== 'connected') continue;
      const stats = await pc.getStats();
      for (const s of stats.values()) {
        if (s.type === 'transport' && s.selectedCandidatePairId) {
          const pair = stats.get(s.selectedCandidatePairId);
          const local = pair && stats.get(pair.localCandidateId);
          out.push(local ? local.protocol : 'unknown');
        }
      }
    }
    return out;
  });
}

async function tcpPage(user) {
  const context = await browser.newContext({ viewport: { width: 1100, height: 800 } });
  // Record every peer connection the page makes, to read its selected pair.
  await context.addInitScript(() => {
    const Native = window.RTCPeerConnection;
    window.__pcs = [];
    window.RTCPeerConnection = function (...a) { const pc = new Native(...a); window.__pcs.push(pc); return pc; };
    window.RTCPeerConnection.prototype = Native.prototype;
    Object.setPrototypeOf(window.RTCPeerConnection, Native);
  });
  return openPage(context, server.portal, user);
}

const blocked = process.env.TESSERA_UDP_BLOCKED === '1';

test('publish and subscribe with UDP blocked: media flows over ICE-TCP', { skip: !blocked && 'needs the UDP-blocked namespace of tessera/tests/browser.rs' }, async () => {
  const alice = await tcpPage('alice');
  await alice.click('#publish');
  const bob = await tcpPage('bob');
  const seen = await waitVideo(bob, '.tile.remote video', 'bob sees alice over TCP');
  assert.equal(seen.width, 640);
  const a = await selectedProtocols(alice);
  const b = await selectedProtocols(bob);
  console.log(`selected pairs: alice ${JSON.stringify(a)}, bob ${JSON.stringify(b)}; video ${seen.width}x${seen.height} changed=${seen.changed}`);
  assert.ok(a.length >= 1 && a.every((p) => p === 'tcp'), `alice: ${JSON.stringify(a)}`);
  assert.ok(b.length >= 1 && b.every((p) => p === 'tcp'), `bob: ${JSON.stringify(b)}`);
});
