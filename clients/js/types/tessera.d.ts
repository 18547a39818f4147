// Type declarations for the Tessera browser client (clients/js/src/index.js).

export type ErrorCode =
  | 'unauthorized' | 'room_full' | 'token_expired' | 'token_used' | 'token_invalid'
  | 'room_not_found' | 'invalid_role' | 'too_many_inputs' | 'flooding' | 'not_found'
  | 'reconnection_failed' | 'not_joined' | 'connect_error' | 'timeout' | 'session_failed'
  | 'webrtc_error' | 'dropped' | 'bad_request' | 'server_error';

export class ConferenceError extends Error {
  constructor(message: string, code?: ErrorCode);
  readonly code: ErrorCode;
}

export function errorCode(message: string): ErrorCode;
export function portalUrl(token: string): string;
export function refreshDelay(ticket: string, now?: number): number;
export function decodeBase64Json(s: string): any;

export interface Participant { id: string; user: string; role: string }

export interface TrackInfo {
  type: 'audio' | 'video';
  source?: string;
  format?: { codec: string; sampleRate?: number; channelNum?: number; profile?: string };
  status?: 'active' | 'inactive';
  mid?: string;
  /** Its id (`<stream>-<kind>`, `<stream>-video-<rid>` for a simulcast layer). */
  id?: string;
  /** A simulcast layer's RID. */
  rid?: string;
  parameters?: { resolution?: { width: number; height: number }; framerate?: number; bitrate?: number };
}

/** A simulcast layer of a remote video. */
export interface Layer { rid: string; id: string; width?: number; height?: number }

/** Three layers, lowest first: quarter, half and full size (150 kbit/s, 500 kbit/s, 1.5 Mbit/s at most). */
export const DEFAULT_SIMULCAST: RTCRtpEncodingParameters[];
export function pickLayer(layers: Layer[], name: 'high' | 'medium' | 'low' | 'auto'): Layer | null;
/** The name `setLayer` gives the layer at `index` of `count` (lowest first). */
export function layerName(index: number, count: number): 'high' | 'medium' | 'low';

/** A forward (one participant's) or mixed (a view's) stream. Events: `ended`, `updated`. */
export class RemoteStream extends EventTarget {
  readonly id: string;
  readonly type: 'forward' | 'mixed';
  readonly origin?: string;
  readonly attributes: Record<string, unknown>;
  readonly label?: string;
  readonly media: { tracks: TrackInfo[] };
  readonly info: Record<string, any>;
  readonly kinds: Array<'audio' | 'video'>;
  /** A simulcast video's layers, lowest first; empty when not simulcast. */
  readonly layers: Layer[];
}

/** Events: `error` (ev.error: the server ended it), `ended`, `layerschanged` (the server changed `activeLayers`). */
export class Publication extends EventTarget {
  readonly id: string;
  /** The simulcast layers (RIDs) the server wants sent (the others are paused); null until it says. */
  readonly activeLayers: string[] | null;
  mute(kind?: 'audio' | 'video' | 'av'): Promise<unknown>;
  unmute(kind?: 'audio' | 'video' | 'av'): Promise<unknown>;
  stop(): Promise<void>;
}

/** Events: `error` (ev.error: the server ended it), `ended`. */
export class Subscription extends EventTarget {
  readonly id: string;
  readonly stream: MediaStream;
  /** The simulcast layer asked for ('auto' until `setLayer`). */
  readonly layer: 'high' | 'medium' | 'low' | 'auto';
  /** Asks for another simulcast layer; the server moves at its next keyframe. */
  setLayer(name: 'high' | 'medium' | 'low' | 'auto'): Promise<void>;
  /** The simulcast layer arriving now (nearest the decoded picture's size); null before a picture or without layers. */
  currentLayer(): Promise<(Layer & { name: 'high' | 'medium' | 'low' }) | null>;
  /** Pauses the video while `element` is off screen or the page hidden; returns a function that stops watching. */
  pauseWhenHidden(element: Element): () => void;
  mute(kind?: 'audio' | 'video' | 'av'): Promise<unknown>;
  unmute(kind?: 'audio' | 'video' | 'av'): Promise<unknown>;
  stop(): Promise<void>;
}

export interface JoinResult { self: Participant & { permission: unknown }; participants: Participant[]; remoteStreams: RemoteStream[] }

/**
 * Events: `streamadded` (ev.stream), `participantjoined` / `participantleft` (ev.participant),
 * `messagereceived` (ev.message, ev.origin, ev.to), `serverdisconnected` (ev.reason), `reconnected`.
 */
export class ConferenceClient extends EventTarget {
  constructor(options?: { rtcConfiguration?: RTCConfiguration });
  readonly remoteStreams: RemoteStream[];
  readonly participants: Participant[];
  join(token: string): Promise<JoinResult>;
  publish(
    stream: MediaStream,
    options?: { source?: 'camera' | 'screen-cast'; attributes?: Record<string, unknown>; simulcast?: boolean | RTCRtpEncodingParameters[] },
  ): Promise<Publication>;
  /** `layer`: the simulcast layer to start on (default 'auto'). */
  subscribe(stream: RemoteStream, options?: { audio?: boolean; video?: boolean; layer?: 'high' | 'medium' | 'low' | 'auto' }): Promise<Subscription>;
  send(message: string, to?: string): Promise<unknown>;
  leave(): Promise<void>;
}
