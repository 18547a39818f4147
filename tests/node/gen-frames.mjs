// Prints real Engine.IO / Socket.IO frames produced by the official parsers.
// The Rust unit tests in portal/src/socketio/{engine,packet}.rs paste these as literals.
// Run: node gen-frames.mjs
import { createRequire } from 'node:module';
import * as eio from 'engine.io-parser';
import { Encoder, PacketType } from 'socket.io-parser';

const require = createRequire(import.meta.url);
const fs = require('node:fs');
const ver = (p) => JSON.parse(fs.readFileSync(new URL(`./node_modules/${p}/package.json`, import.meta.url))).version;
console.log(`engine.io-parser ${ver('engine.io-parser')}, socket.io-parser ${ver('socket.io-parser')}`);

const show = (label, s) => console.log(label.padEnd(28), JSON.stringify(s));

// engine.io packets (text transport: supportsBinary = false => base64 for binary)
const packets = [
  { type: 'open', data: JSON.stringify({ sid: 'abc', upgrades: ['websocket'], pingInterval: 25000, pingTimeout: 20000, maxPayload: 1000000 }) },
  { type: 'close' },
  { type: 'ping' },
  { type: 'ping', data: 'probe' },
  { type: 'pong' },
  { type: 'pong', data: 'probe' },
  { type: 'message', data: 'hello é 🎉' },
  { type: 'upgrade' },
  { type: 'noop' },
  { type: 'message', data: Buffer.from([1, 2, 3, 255]) },
];
for (const p of packets) {
  eio.encodePacket(p, false, (enc) => show(`eio ${p.type} (text)`, enc));
}
eio.encodePacket({ type: 'message', data: Buffer.from([1, 2, 3, 255]) }, true, (enc) => show('eio binary (ws)', [...enc]));
eio.encodePayload([
  { type: 'message', data: '40' },
  { type: 'message', data: '42["echo","a,b"]' },
  { type: 'ping' },
  { type: 'message', data: Buffer.from([1, 2, 3]) },
], (enc) => show('eio payload', enc));
show('eio decodePayload', eio.decodePayload('4hello\x1e2\x1ebAQID', 'nodebuffer'));

// socket.io packets
const enc = new Encoder();
const sio = [
  ['CONNECT /', { type: PacketType.CONNECT, nsp: '/' }],
  ['CONNECT / auth', { type: PacketType.CONNECT, nsp: '/', data: { token: 'abc' } }],
  ['CONNECT /admin', { type: PacketType.CONNECT, nsp: '/admin' }],
  ['CONNECT reply', { type: PacketType.CONNECT, nsp: '/', data: { sid: 'oSO0OpakMV_3jnilAAAA' } }],
  ['DISCONNECT /', { type: PacketType.DISCONNECT, nsp: '/' }],
  ['DISCONNECT /admin', { type: PacketType.DISCONNECT, nsp: '/admin' }],
  ['EVENT', { type: PacketType.EVENT, nsp: '/', data: ['hello', 1, { a: 'b' }] }],
  ['EVENT ack', { type: PacketType.EVENT, nsp: '/', data: ['echo', 'x'], id: 12 }],
  ['EVENT /admin ack', { type: PacketType.EVENT, nsp: '/admin', data: ['echo', 'x'], id: 13 }],
  ['EVENT unicode', { type: PacketType.EVENT, nsp: '/', data: ['msg', 'é 🎉 "q"'] }],
  ['ACK', { type: PacketType.ACK, nsp: '/', data: ['ok', { n: 1 }], id: 12 }],
  ['ACK empty', { type: PacketType.ACK, nsp: '/', data: [], id: 0 }],
  ['CONNECT_ERROR', { type: PacketType.CONNECT_ERROR, nsp: '/admin', data: { message: 'Invalid namespace' } }],
  ['BINARY_EVENT', { type: PacketType.EVENT, nsp: '/', data: ['bin', Buffer.from([1, 2])] }],
  ['BINARY_EVENT ack', { type: PacketType.EVENT, nsp: '/', data: ['bin', Buffer.from([1, 2])], id: 7 }],
  ['BINARY_ACK', { type: PacketType.ACK, nsp: '/', data: [Buffer.from([1])], id: 8 }],
];
for (const [label, p] of sio) {
  const out = enc.encode(p);
  show(`sio ${label}`, out.map((x) => (typeof x === 'string' ? x : `<${x.length} bytes>`)));
}

// Engine.IO v3 (engine.io-parser 2.x, what socket.io-client 2.x uses), for the EIO3 tests
// in portal/src/socketio/engine.rs: `<length>:<packet>` records, lengths in UTF-16 units.
const eio3 = require('socket.io-client-v2/node_modules/engine.io-parser');
console.log(`engine.io-parser (v3) ${ver('socket.io-client-v2/node_modules/engine.io-parser')}`);
eio3.encodePayload([
  { type: 'message', data: '40' },
  { type: 'message', data: '42["echo","a,b"]' },
  { type: 'ping' },
  { type: 'message', data: Buffer.from([1, 2, 3]) },
], false, (enc) => show('eio3 payload', enc));
eio3.encodePayload([{ type: 'message', data: '42["e","é 🎉"]' }, { type: 'ping', data: 'probe' }], false, (enc) => show('eio3 payload utf16', enc));
eio3.encodePayload([], false, (enc) => show('eio3 empty payload', enc));
eio3.encodePacket({ type: 'message', data: Buffer.from([1, 2, 3, 255]) }, true, (enc) => show('eio3 binary (ws)', [...enc]));
for (const d of ['3:4🎉', '4:4🎉', '0:', '2:4a0:2:40', '2:4a1']) {
  const out = [];
  eio3.decodePayload(d, (p) => { out.push(p); });
  show(`eio3 decodePayload ${JSON.stringify(d)}`, out);
}
