// Tessera browser client: joins a room through the portal (OWT Client-Portal protocol
// 1.2 over Socket.IO), publishes local media and subscribes to forward and mixed
// streams with one RTCPeerConnection per publication/subscription (the server also
// accepts one shared connection; separate ones keep renegotiation out of the app's way).
import { io } from 'socket.io-client';

/** Error with a stable `code` for every failure the portal reports. */
export class ConferenceError extends Error {
  constructor(message, code) {
    super(message);
    this.name = 'ConferenceError';
    this.code = code || errorCode(message);
  }
}

const CODES = [
  [/^unauthorized$/, 'unauthorized'],
  [/^Room is full$/, 'room_full'],
  [/^Token expired$/, 'token_expired'],
  [/^Token already used$/, 'token_used'],
  [/^Invalid token signature$/, 'token_invalid'],
  [/^Malformed token$/, 'token_invalid'],
  [/^Room not found/, 'room_not_found'],
  [/^Invalid role$/, 'invalid_role'],
  [/^Too many inputs$/, 'too_many_inputs'],
  [/^Too many requests$/, 'flooding'],
  [/does NOT exist/, 'not_found'],
  [/^Ticket is expired$|reconnection ticket/i, 'reconnection_failed'],
  [/^Illegal request$/, 'not_joined'],
];

/** Maps a portal error string to a stable code. */
export function errorCode(message) {
  for (const [re, code] of CODES) if (re.test(String(message))) return code;
  return 'server_error';
}

/** Decodes a base64 JSON token or ticket. */
export function decodeBase64Json(s) {
  const text = typeof atob === 'function' ? atob(s) : Buffer.from(s, 'base64').toString('binary');
  return JSON.parse(text);
}

/** When to refresh a reconnection ticket: a minute before it expires, at least 10 s from now. */
export function refreshDelay(ticket, now = Date.now()) {
  const { notAfter } = decodeBase64Json(ticket);
  return Math.max(10_000, notAfter - now - 60_000);
}

/** The portal URL a token points to. */
export function portalUrl(token) {
  const { host, secure } = decodeBase64Json(token);
  if (/^https?:\/\//.test(host)) return host;
  return `${secure ? 'https' : 'http'}://${host}`;
}

/** A stream in the room: a participant's forward stream or a view's mixed stream. */
export class RemoteStream extends EventTarget {
  constructor(info) {
    super();
    this.id = info.id;
    this.type = info.type;
    this.update(info);
  }

  update(info) {
    this.info = info.info || {};
    this.media = info.media || { tracks: [] };
    this.origin = this.info.owner;
    this.attributes = this.info.attributes || {};
    this.label = this.info.label;
  }

  /** Which kinds the stream carries. */
  get kinds() {
    return [...new Set(this.media.tracks.map((t) => t.type))];
  }

  /** A simulcast video's layers, lowest first (by picture size where the server knows
   * it, else as the publisher listed them): `[{rid, id, width?, height?}]`; empty when
   * the video is not simulcast. */
  get layers() {
    const layers = this.media.tracks
      .map((t, i) => ({ t, i }))
      .filter(({ t }) => t.type === 'video' && t.rid)
      .map(({ t, i }) => ({ rid: t.rid, id: t.id, width: t.parameters?.resolution?.width, height: t.parameters?.resolution?.height, order: i }));
    if (layers.every((l) => l.width && l.height)) layers.sort((a, b) => a.width * a.height - b.width * b.height || a.order - b.order);
    return layers.map(({ order, ...l }) => l);
  }
}

/** What `publish(stream, {simulcast: true})` sends: three layers, lowest first. */
export const DEFAULT_SIMULCAST = [
  { rid: 'q', scaleResolutionDownBy: 4, maxBitrate: 150_000 },
  { rid: 'h', scaleResolutionDownBy: 2, maxBitrate: 500_000 },
  { rid: 'f', scaleResolutionDownBy: 1, maxBitrate: 1_500_000 },
];

/** The layer a `setLayer` name picks among `layers` (lowest first); null for 'auto'. */
export function pickLayer(layers, name) {
  if (name === 'auto') return null;
  const at = { low: 0, medium: Math.floor((layers.length - 1) / 2), high: layers.length - 1 }[name];
  if (at === undefined) throw new ConferenceError(`Unknown layer ${name}: high, medium, low or auto`, 'bad_request');
  if (!layers.length) throw new ConferenceError('The stream has no simulcast layers', 'bad_request');
  return layers[at];
}

/** What publications and subscriptions share: pause/resume and stop over the portal. */
class Session extends EventTarget {
  constructor(client, id, pc, control, end) {
    super();
    this.id = id;
    this._client = client;
    this._pc = pc;
    this._control = control;
    this._end = end;
  }
  mute(kind = 'av') {
    return this._client._request(this._control, { id: this.id, operation: 'pause', data: kind });
  }
  unmute(kind = 'av') {
    return this._client._request(this._control, { id: this.id, operation: 'play', data: kind });
  }
  async stop() {
    this._pc.close();
    this._client._forget(this.id);
    try {
      await this._client._request(this._end, { id: this.id });
    } finally {
      // Ended here whatever the server says (it may have ended it already).
      this._finish();
    }
  }

  /** Fires `ended`, once. */
  _finish() {
    if (this._done) return;
    this._done = true;
    this.dispatchEvent(new Event('ended'));
  }

  /** The server ended this session (its transport failed, or in a cluster the node serving
   * it is gone): `error` with `ev.error`, then `ended`. Publish or subscribe again. */
  _fail(error) {
    if (this._done) return;
    this._pc.close();
    this._client._forget(this.id);
    const ev = new Event('error');
    ev.error = error;
    this.dispatchEvent(ev);
    this._finish();
  }
}

/** A local stream being published. */
export class Publication extends Session {
  constructor(client, id, pc) {
    super(client, id, pc, 'stream-control', 'unpublish');
    /** The simulcast layers (RIDs) the server wants sent; null until it says. */
    this.activeLayers = null;
  }

  /** The server says which simulcast layers someone takes: the others stop being encoded
   * and sent until they are wanted again. Updates apply one at a time, the latest last. */
  _setActiveLayers(active) {
    this.activeLayers = active;
    this._layers = (this._layers || Promise.resolve()).then(() => this._applyLayers());
    return this._layers;
  }

  async _applyLayers() {
    const sender = this._pc.getSenders().find((s) => s.track && s.track.kind === 'video');
    if (!sender || !this.activeLayers) return;
    const params = sender.getParameters();
    if (!params.encodings || params.encodings.length < 2) return;
    let changed = false;
    for (const e of params.encodings) {
      const on = !e.rid || this.activeLayers.includes(e.rid);
      if (e.active !== on) { e.active = on; changed = true; }
    }
    if (!changed) return;
    try {
      await sender.setParameters(params);
      this.dispatchEvent(new Event('layerschanged'));
    } catch (e) {
      // (The server asks again while a layer it wants does not flow.)
    }
  }
}

/** A remote stream being received; attach `stream` to a `<video>`. */
export class Subscription extends Session {
  constructor(client, id, pc, stream, remote) {
    super(client, id, pc, 'subscription-control', 'unsubscribe');
    this.stream = stream;
    this._remote = remote;
    /** The simulcast layer asked for: 'high', 'medium', 'low' or 'auto' (the server's pick). */
    this.layer = 'auto';
  }

  /** Asks for another simulcast layer of the stream ('high' | 'medium' | 'low' | 'auto');
   * the server moves at that layer's next keyframe. */
  async setLayer(name) {
    const layer = pickLayer(this._remote.layers, name);
    const from = layer ? layer.id : this._remote.id;
    await this._client._request(this._control, { id: this.id, operation: 'update', data: { video: { from } } });
    this.layer = name;
  }

  /** The simulcast layer arriving now (on 'auto', the server's pick): the layer of
   * `remoteStream.layers` nearest the size of the pictures being decoded, as
   * `{rid, id, width, height, name}` with `name` 'low', 'medium' or 'high'; null before the
   * first picture, or when the stream has no layers or their sizes are not known yet. */
  async currentLayer() {
    const layers = this._remote.layers.filter((l) => l.width && l.height);
    if (!layers.length) return null;
    let size = null;
    (await this._pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp' && s.kind === 'video' && s.frameWidth) size = s.frameWidth * s.frameHeight;
    });
    if (size === null) return null;
    let at = 0;
    layers.forEach((l, i) => { if (Math.abs(l.width * l.height - size) < Math.abs(layers[at].width * layers[at].height - size)) at = i; });
    return { ...layers[at], name: layerName(at, layers.length) };
  }

  /** Stops this subscription's video while `element` (where it plays) is off screen or the
   * page is hidden, and resumes it when it shows again: the server sends nothing meanwhile
   * (no bandwidth, no decoding) and starts again on a keyframe. Returns a function that
   * stops watching (and resumes the video). Do not also `mute('video')` by hand meanwhile. */
  pauseWhenHidden(element) {
    let onScreen = true;
    let paused = false;
    const apply = () => {
      const hide = this._watching && (!onScreen || document.visibilityState === 'hidden');
      if (hide === paused || this._done) return;
      paused = hide;
      (hide ? this.mute('video') : this.unmute('video')).catch(() => {});
    };
    const observer = new IntersectionObserver((entries) => {
      onScreen = entries[entries.length - 1].isIntersecting;
      apply();
    });
    const unwatch = () => {
      observer.disconnect();
      document.removeEventListener('visibilitychange', apply);
    };
    this._watching = true;
    observer.observe(element);
    document.addEventListener('visibilitychange', apply);
    this.addEventListener('ended', unwatch, { once: true });
    return () => {
      this._watching = false;
      unwatch();
      apply();
    };
  }
}

/** The name `setLayer` gives the layer at `index` of `count` (lowest first). */
export function layerName(index, count) {
  if (index === count - 1) return 'high';
  return index === 0 ? 'low' : 'medium';
}

/** Rejects after `ms` with a `timeout` error naming what did not come. */
function deadline(what, ms = 10_000) {
  return new Promise((_, reject) => setTimeout(() => reject(new ConferenceError(`No ${what} from the server`, 'timeout')), ms));
}

function waitGathering(pc, ms = 3000) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { if (pc.iceGatheringState === 'complete') { pc.removeEventListener('icegatheringstatechange', done); resolve(); } };
    pc.addEventListener('icegatheringstatechange', done);
    setTimeout(resolve, ms);
  });
}

/** A participant's connection to a Tessera room. */
export class ConferenceClient extends EventTarget {
  /** @param {{rtcConfiguration?: RTCConfiguration, io?: Function}} options */
  constructor(options = {}) {
    super();
    this._options = options;
    this._streams = new Map();
    this._participants = new Map();
    this._sessions = new Map(); // transport/session id → {resolveAnswer, resolveReady, reject}
    this._publications = new Map(); // publication id → Publication
    this._ticket = null;
    this._joined = false;
  }

  /** Streams currently in the room. */
  get remoteStreams() {
    return [...this._streams.values()];
  }

  /** Participants currently in the room. */
  get participants() {
    return [...this._participants.values()];
  }

  _request(name, data) {
    return new Promise((resolve, reject) => {
      const ack = (status, payload) => {
        if (status === 'ok' || status === 'success') resolve(payload);
        else reject(new ConferenceError(payload));
      };
      if (!this._socket) return reject(new ConferenceError('Not connected', 'not_joined'));
      if (data === undefined) this._socket.emit(name, ack);
      else this._socket.emit(name, data, ack);
    });
  }

  /** Joins the room the token is for; resolves to `{self, participants, remoteStreams}`. */
  join(token) {
    const connect = this._options.io || io;
    return new Promise((resolve, reject) => {
      const socket = connect(portalUrl(token), { reconnection: true, reconnectionAttempts: 10, forceNew: true });
      this._socket = socket;
      this._bind(socket);
      socket.once('connect_error', (e) => { if (!this._joined) reject(new ConferenceError(`connect_error: ${e.message}`, 'connect_error')); });
      socket.once('connect', async () => {
        try {
          const info = await this._request('login', { token, userAgent: { sdk: { version: '1.0', type: 'JavaScript' } }, protocol: '1.2' });
          this._joined = true;
          this.self = { id: info.id, user: info.user, role: info.role, permission: info.permission };
          this.roomId = info.room.id;
          this.views = info.room.views;
          // STUN/TURN servers (with this participant's TURN credentials) the server hands out.
          this._iceServers = Array.isArray(info.iceServers) ? info.iceServers : [];
          for (const p of info.room.participants) this._participants.set(p.id, p);
          for (const s of info.room.streams) this._streams.set(s.id, new RemoteStream(s));
          this._setTicket(info.reconnectionTicket);
          // Later connects are reconnections: resume the session.
          socket.on('connect', () => this._relogin());
          resolve({ self: this.self, participants: this.participants, remoteStreams: this.remoteStreams });
        } catch (e) {
          socket.close();
          reject(e);
        }
      });
    });
  }

  _setTicket(ticket) {
    this._ticket = ticket;
    clearTimeout(this._refreshTimer);
    try {
      this._refreshTimer = setTimeout(async () => {
        try { this._setTicket(await this._request('refreshReconnectionTicket')); } catch { /* next relogin will tell */ }
      }, refreshDelay(ticket));
    } catch { /* unreadable ticket: no refresh */ }
  }

  async _relogin() {
    try {
      const ticket = await this._request('relogin', this._ticket);
      if (typeof ticket === 'string') this._setTicket(ticket);
      this.dispatchEvent(new Event('reconnected'));
    } catch (e) {
      this._leaveLocally(e);
    }
  }

  _leaveLocally(reason) {
    this._joined = false;
    clearTimeout(this._refreshTimer);
    for (const s of this._sessions.values()) s.pc && s.pc.close();
    this._sessions.clear();
    this._publications.clear();
    if (this._socket) this._socket.close();
    const ev = new Event('serverdisconnected');
    ev.reason = reason;
    this.dispatchEvent(ev);
  }

  _bind(socket) {
    socket.on('participant', (m) => {
      if (m.action === 'join') {
        this._participants.set(m.data.id, m.data);
        const ev = new Event('participantjoined');
        ev.participant = m.data;
        this.dispatchEvent(ev);
      } else if (m.action === 'leave') {
        const p = this._participants.get(m.data);
        this._participants.delete(m.data);
        const ev = new Event('participantleft');
        ev.participant = p || { id: m.data };
        this.dispatchEvent(ev);
      }
    });
    socket.on('stream', (m) => {
      if (m.status === 'add') {
        const s = new RemoteStream(m.data);
        this._streams.set(s.id, s);
        const ev = new Event('streamadded');
        ev.stream = s;
        this.dispatchEvent(ev);
      } else if (m.status === 'remove') {
        const s = this._streams.get(m.id);
        this._streams.delete(m.id);
        this._publications.delete(m.id);
        if (s) s.dispatchEvent(new Event('ended'));
      } else if (m.status === 'update') {
        if (m.data && m.data.field === 'video.layers') {
          const p = this._publications.get(m.id);
          if (p && m.data.value && Array.isArray(m.data.value.active)) p._setActiveLayers(m.data.value.active);
          return;
        }
        const s = this._streams.get(m.id);
        if (!s) return;
        if (m.data.field === 'video.layout') s.info.layout = m.data.value;
        else if (m.data.field === 'activeInput') s.info.activeInput = m.data.value;
        else if (m.data.field === '.') s.update(m.data.value);
        else if (/^(audio|video)\.status$/.test(m.data.field)) {
          const kind = m.data.field.split('.')[0];
          for (const t of s.media.tracks) if (t.type === kind) t.status = m.data.value;
        }
        const ev = new Event('updated');
        ev.field = m.data.field;
        ev.value = m.data.value;
        s.dispatchEvent(ev);
      }
    });
    socket.on('text', (m) => {
      const ev = new Event('messagereceived');
      Object.assign(ev, { message: m.message, origin: m.from, to: m.to });
      this.dispatchEvent(ev);
    });
    socket.on('progress', (m) => {
      const s = this._sessions.get(m.sessionId) || this._sessions.get(m.id);
      if (!s) return;
      if (m.status === 'soac' && m.data && m.data.type === 'answer') s.onAnswer(m.data.sdp);
      else if (m.status === 'ready' && m.sessionId) s.onReady();
      else if (m.status === 'error') s.onError(new ConferenceError(String(m.data || 'session failed'), 'session_failed'));
    });
    socket.on('drop', () => this._leaveLocally(new ConferenceError('Dropped by the server', 'dropped')));
  }

  /** After a session started, a `progress` error for it or its transport ends it. */
  _watch(session) {
    const entry = this._sessions.get(session.id);
    if (entry) entry.onError = (e) => session._fail(e);
  }

  /** Forgets a session: its signaling entries (by session and transport id) and its
   * publication. */
  _forget(id) {
    const entry = this._sessions.get(id);
    for (const [key, s] of this._sessions) if (s === entry) this._sessions.delete(key);
    this._publications.delete(id);
  }

  /** A session the server made whose setup failed here: forgotten, and ended there (best
   * effort: the server may have ended it already). */
  _abandon(id, end) {
    this._forget(id);
    this._request(end, { id }).catch(() => {});
  }

  /** Offers, asks the server for the session (`started.id` once it has made one), and
   * applies its answer. */
  async _negotiate(pc, request, data, started) {
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    await waitGathering(pc);
    const ack = await this._request(request, { ...data, transport: { type: 'webrtc' } });
    started.id = ack.id;
    const session = { pc };
    const answered = new Promise((resolve, reject) => { session.onAnswer = resolve; session.onError = reject; });
    const ready = new Promise((resolve, reject) => { session.onReady = resolve; const prev = session.onError; session.onError = (e) => { prev(e); reject(e); }; });
    // (Awaited only once answered: an error before that must not also surface unhandled.)
    ready.catch(() => {});
    this._sessions.set(ack.id, session);
    if (ack.transportId !== ack.id) this._sessions.set(ack.transportId, session);
    await this._request('soac', { id: ack.transportId, signaling: { type: 'offer', sdp: pc.localDescription.sdp } });
    const sdp = await Promise.race([answered, deadline('answer')]);
    await pc.setRemoteDescription({ type: 'answer', sdp });
    return { id: ack.id, ready: Promise.race([ready, deadline('ready')]) };
  }

  _peer() {
    // The application's rtcConfiguration wins; without iceServers of its own, the server's.
    const config = { ...(this._options.rtcConfiguration || {}) };
    if (!config.iceServers && this._iceServers && this._iceServers.length) config.iceServers = this._iceServers;
    return new RTCPeerConnection(config);
  }

  /** Publishes a MediaStream (its first audio and first video track); `simulcast: true`
   * sends the video as DEFAULT_SIMULCAST's three layers, or give the encodings yourself. */
  async publish(mediaStream, options = {}) {
    const pc = this._peer();
    const tracks = [];
    const simulcast = options.simulcast === true ? DEFAULT_SIMULCAST : options.simulcast;
    if (simulcast && !(Array.isArray(simulcast) && simulcast.length > 1 && simulcast.every((e) => e && e.rid))) {
      throw new ConferenceError('simulcast: true, or at least two encodings each with a rid', 'bad_request');
    }
    for (const track of [mediaStream.getAudioTracks()[0], mediaStream.getVideoTracks()[0]]) {
      if (!track) continue;
      const init = { direction: 'sendonly', streams: [mediaStream] };
      if (track.kind === 'video' && simulcast) init.sendEncodings = simulcast.map((e) => ({ ...e }));
      pc.addTransceiver(track, init);
    }
    const started = {};
    try {
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      for (const t of pc.getTransceivers()) {
        const kind = t.sender.track.kind;
        const source = kind === 'audio' ? 'mic' : (options.source || 'camera');
        tracks.push({ type: kind, mid: t.mid, source });
      }
      const { id, ready } = await this._negotiate(pc, 'publish', { media: { tracks }, attributes: options.attributes || {} }, started);
      await ready;
      const publication = new Publication(this, id, pc);
      this._publications.set(id, publication);
      publication.addEventListener('ended', () => this._publications.delete(id));
      this._watch(publication);
      return publication;
    } catch (e) {
      pc.close();
      if (started.id) this._abandon(started.id, 'unpublish');
      throw e instanceof ConferenceError ? e : new ConferenceError(e.message || String(e), 'webrtc_error');
    }
  }

  /** Subscribes to a remote stream; resolves when media flows. */
  async subscribe(remoteStream, options = {}) {
    const want = { audio: options.audio !== false, video: options.video !== false };
    const kinds = remoteStream.kinds.filter((k) => want[k]);
    if (!kinds.length) throw new ConferenceError('Nothing to subscribe to', 'bad_request');
    const layer = pickLayer(remoteStream.layers, options.layer || 'auto');
    const pc = this._peer();
    const mediaStream = new MediaStream();
    const gotTrack = new Promise((resolve) => {
      pc.addEventListener('track', (e) => { mediaStream.addTrack(e.track); resolve(); });
    });
    for (const k of kinds) pc.addTransceiver(k, { direction: 'recvonly' });
    const started = {};
    try {
      const offer = await pc.createOffer();
      await pc.setLocalDescription(offer);
      // A simulcast layer is asked for by its track's id (OWT's way).
      const tracks = pc.getTransceivers().map((t, i) => ({ type: kinds[i], mid: t.mid, from: kinds[i] === 'video' && layer ? layer.id : remoteStream.id }));
      const { id, ready } = await this._negotiate(pc, 'subscribe', { media: { tracks } }, started);
      await Promise.all([ready, Promise.race([gotTrack, deadline('track')])]);
      const sub = new Subscription(this, id, pc, mediaStream, remoteStream);
      sub.layer = options.layer || 'auto';
      remoteStream.addEventListener('ended', () => { pc.close(); this._forget(id); sub._finish(); });
      this._watch(sub);
      return sub;
    } catch (e) {
      pc.close();
      if (started.id) this._abandon(started.id, 'unsubscribe');
      throw e instanceof ConferenceError ? e : new ConferenceError(e.message || String(e), 'webrtc_error');
    }
  }

  /** Sends a text message to everyone or to one participant. */
  send(message, to = 'all') {
    return this._request('text', { to, message });
  }

  /** Leaves the room. */
  async leave() {
    try { await this._request('logout'); } finally { this._leaveLocally(null); }
  }
}
