// The demo page: join a room with a token from the dev-only endpoint, publish camera and
// microphone, show every forward stream and the room's mixed stream, chat.
import { ConferenceClient } from '/sdk/tessera.js';

const $ = (id) => document.getElementById(id);
let client = null;
// This participant's id, once joined.
let myId = null;
let publication = null;
const tiles = new Map();

function status(text) { $('status').textContent = text; }
function showError(e) {
  $('error').hidden = false;
  $('error').textContent = `${e.code ? `[${e.code}] ` : ''}${e.message || e}`;
}

function renderPeople() {
  $('people').replaceChildren(...client.participants.map((p) => {
    const li = document.createElement('li');
    li.textContent = `${p.user} (${p.role})${p.id === client.self.id ? ' — you' : ''}`;
    return li;
  }));
}

function addMessage(text) {
  const li = document.createElement('li');
  li.textContent = text;
  $('messages').append(li);
  li.scrollIntoView({ block: 'end' });
}

async function show(stream) {
  if (tiles.has(stream.id)) return;
  if (stream.type === 'forward' && publication && stream.id === publication.id) return;
  tiles.set(stream.id, null);
  try {
    const sub = await client.subscribe(stream);
    if (stream.type === 'mixed') {
      $('mixed').srcObject = sub.stream;
      $('mixed-tile').hidden = false;
      tiles.set(stream.id, $('mixed-tile'));
    } else {
      const fig = document.createElement('figure');
      fig.className = 'tile remote';
      fig.dataset.stream = stream.id;
      const video = document.createElement('video');
      Object.assign(video, { autoplay: true, playsInline: true, srcObject: sub.stream });
      const cap = document.createElement('figcaption');
      const owner = client.participants.find((p) => p.id === stream.origin);
      cap.textContent = owner ? owner.user : 'guest';
      fig.append(video, cap);
      $('remotes').append(fig);
      tiles.set(stream.id, fig);
    }
    stream.addEventListener('ended', () => {
      const t = tiles.get(stream.id);
      if (t && t.id !== 'mixed-tile') t.remove();
      tiles.delete(stream.id);
    });
  } catch (e) {
    tiles.delete(stream.id);
    showError(e);
  }
}

$('join-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  $('error').hidden = true;
  const room = $('room').value.trim() || 'dev';
  const user = $('user').value.trim() || `guest-${Math.floor(Math.random() * 1000)}`;
  try {
    status('Getting a token…');
    const res = await fetch('/dev/token', { method: 'POST', headers: { 'content-type': 'application/json' }, body: JSON.stringify({ room, user, role: $('role').value }) });
    const token = await res.text();
    if (!res.ok) throw new Error(JSON.parse(token).error.message);
    client = new ConferenceClient();
    window.tesseraClient = client; // for tests and the console
    client.addEventListener('streamadded', (e) => show(e.stream));
    client.addEventListener('participantjoined', () => renderPeople());
    client.addEventListener('participantleft', () => renderPeople());
    client.addEventListener('messagereceived', (e) => {
      // A message to everyone comes back to its sender too; the form showed it already.
      if (e.origin === myId) return;
      const from = client.participants.find((p) => p.id === e.origin);
      addMessage(`${from ? from.user : e.origin}: ${e.message}`);
    });
    client.addEventListener('serverdisconnected', () => status('Disconnected.'));
    client.addEventListener('reconnected', () => status(`Reconnected to room ${room}.`));
    const info = await client.join(token);
    myId = info.self.id;
    status(`In room ${room} as ${info.self.user} (${info.self.role}).`);
    renderPeople();
    $('join').disabled = true;
    $('publish').disabled = false;
    $('leave').disabled = false;
    for (const s of info.remoteStreams) show(s);
  } catch (e) {
    status('Not connected.');
    showError(e);
  }
});

$('publish').addEventListener('click', async () => {
  $('error').hidden = true;
  try {
    const local = await navigator.mediaDevices.getUserMedia({ audio: true, video: { width: 640, height: 480 } });
    $('local').srcObject = local;
    $('local-tile').hidden = false;
    publication = await client.publish(local);
    $('publish').disabled = true;
    status(`${$('status').textContent.replace(/ Publishing\.$/, '')} Publishing.`);
  } catch (e) {
    showError(e);
  }
});

$('leave').addEventListener('click', async () => {
  await client.leave();
  location.reload();
});

$('chat-form').addEventListener('submit', async (ev) => {
  ev.preventDefault();
  const text = $('chat').value.trim();
  if (!text || !client) return;
  try {
    await client.send(text);
    addMessage(`me: ${text}`);
    $('chat').value = '';
  } catch (e) {
    showError(e);
  }
});

$('layout').addEventListener('change', async () => {
  $('error').hidden = true;
  try {
    const res = await fetch('/dev/layout', {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ room: client.roomId, view: 'common', template: $('layout').value }),
    });
    if (!res.ok) throw new Error((await res.json()).error.message);
  } catch (e) {
    showError(e);
  }
});
