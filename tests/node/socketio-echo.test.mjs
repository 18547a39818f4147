// Interop test of Tessera's Socket.IO server with the official socket.io-client.
//
// Needs a running echo server (started by portal/tests/socketio_node.rs):
//   event "echo"    -> ack('ok', ...args)
//   event "ping-me" -> server emits "pong-you" with the same args
//   event "bye"     -> server disconnects the socket
// Env: TESSERA_SIO_URL (e.g. http://127.0.0.1:1234), optional TESSERA_SIO_MAX_PAYLOAD (bytes).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { io } from 'socket.io-client';

const URL = process.env.TESSERA_SIO_URL;
assert.ok(URL, 'TESSERA_SIO_URL must be set');
const MAX_PAYLOAD = Number(process.env.TESSERA_SIO_MAX_PAYLOAD || 1_000_000);
const WAIT_MS = 5000;

/** Connects a new client; resolves once the Socket.IO CONNECT succeeded. */
function connect(opts = {}) {
  const socket = io(URL, { reconnection: false, forceNew: true, timeout: WAIT_MS, ...opts });
  socket.firstTransport = undefined;
  socket.io.on('open', () => {
    socket.firstTransport = socket.io.engine.transport.name;
  });
  return new Promise((resolve, reject) => {
    socket.once('connect', () => resolve(socket));
    socket.once('connect_error', (err) => {
      socket.close();
      reject(err);
    });
  });
}

/** Resolves with the arguments of the next `event` on `emitter`. */
function once(emitter, event, ms = WAIT_MS) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`timed out waiting for ${event}`)), ms);
    emitter.once(event, (...args) => {
      clearTimeout(timer);
      resolve(args);
    });
  });
}

/** Emits with an acknowledgement callback; resolves with all ack arguments. */
function emitAck(socket, event, ...args) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`no ack for ${event}`)), WAIT_MS);
    socket.emit(event, ...args, (...reply) => {
      clearTimeout(timer);
      resolve(reply);
    });
  });
}

async function checkEcho(socket) {
  const data = { text: 'héllo 🎉 "quoted" \u001e', n: 42, list: [1, null, true] };
  assert.deepEqual(await emitAck(socket, 'echo', data), ['ok', data]);
  assert.deepEqual(await emitAck(socket, 'echo', 'a', 2, { b: [3] }, null), ['ok', 'a', 2, { b: [3] }, null]);
  const pong = once(socket, 'pong-you');
  socket.emit('ping-me', { hello: 'server' }, 7);
  assert.deepEqual(await pong, [{ hello: 'server' }, 7]);
}

async function withClient(opts, fn) {
  const socket = await connect(opts);
  try {
    await fn(socket);
  } finally {
    socket.close();
  }
}

test('default transports: polling, then upgrade to websocket', async () => {
  await withClient({}, async (socket) => {
    assert.equal(socket.firstTransport, 'polling');
    if (socket.io.engine.transport.name !== 'websocket') {
      await once(socket.io.engine, 'upgrade');
    }
    assert.equal(socket.io.engine.transport.name, 'websocket');
    await checkEcho(socket);
  });
});

test('websocket only', async () => {
  await withClient({ transports: ['websocket'] }, async (socket) => {
    assert.equal(socket.firstTransport, 'websocket');
    await checkEcho(socket);
  });
});

test('polling only (survives several heartbeats)', async () => {
  await withClient({ transports: ['polling'] }, async (socket) => {
    assert.equal(socket.io.engine.transport.name, 'polling');
    await checkEcho(socket);
    await new Promise((r) => setTimeout(r, 1000));
    assert.ok(socket.connected);
    await checkEcho(socket);
  });
});

test('many acks in flight come back in order', async () => {
  await withClient({}, async (socket) => {
    const replies = await Promise.all(Array.from({ length: 50 }, (_, i) => emitAck(socket, 'echo', i)));
    assert.deepEqual(replies, Array.from({ length: 50 }, (_, i) => ['ok', i]));
  });
});

for (const transports of [['polling'], ['websocket'], ['polling', 'websocket']]) {
  test(`server disconnect is seen by the client (${transports.join('+')})`, async () => {
    await withClient({ transports }, async (socket) => {
      const disconnected = once(socket, 'disconnect');
      socket.emit('bye');
      const [reason] = await disconnected;
      assert.equal(reason, 'io server disconnect');
      assert.equal(socket.connected, false);
    });
  });
}

for (const transports of [['polling'], ['websocket']]) {
  // The server hands bodies to the network in 4 KiB slices (portal/src/socketio/chunks.rs):
  // a reply many times that, with multi-byte characters across the cuts, comes back whole.
  test(`a large reply comes back whole (${transports.join('+')})`, async () => {
    await withClient({ transports }, async (socket) => {
      const big = 'é🎉x'.repeat(7000) + 'end';
      assert.deepEqual(await emitAck(socket, 'echo', big, { n: 1 }), ['ok', big, { n: 1 }]);
      await checkEcho(socket);
    });
  });
}

for (const transports of [['polling'], ['websocket']]) {
  test(`a message over maxPayload closes only that client (${transports.join('+')})`, async () => {
    const other = await connect();
    try {
      await withClient({ transports }, async (big) => {
        const disconnected = once(big, 'disconnect');
        big.emit('echo', 'x'.repeat(MAX_PAYLOAD + 1000));
        const [reason] = await disconnected;
        assert.match(reason, /^transport (close|error)$/);
      });
      await checkEcho(other);
      assert.ok(other.connected);
    } finally {
      other.close();
    }
  });
}
