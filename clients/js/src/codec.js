// Relay wire protocol v1: message numbers, close codes and the frame codec.
// Pure functions over bytes, no sockets, so they can be tested with literal
// frames. The contract is docs/protocol.md in the relay repository.

import { Decoder, Encoder } from '@msgpack/msgpack';

export const PROTOCOL_VERSION = 1;

/** Message type numbers (element 0 of every message). PING and PONG share 9. */
export const MsgType = Object.freeze({
  WELCOME: 0,
  EVENT: 1,
  STATE: 2,
  DIRECT: 3,
  JOIN: 5,
  LEAVE: 6,
  ERROR: 7,
  DROPPED: 8,
  PING: 9,
  PONG: 9,
});

export const CloseCode = Object.freeze({
  NORMAL: 1000,
  GOING_AWAY: 1001,
  ABNORMAL: 1006, // no close frame: the connection just broke (browser-side code)
  TEXT_FRAME: 1003,
  TOO_MANY_ERRORS: 1008,
  FRAME_TOO_LARGE: 1009,
  INTERNAL_ERROR: 1011,
  SERVICE_RESTART: 1012,
  AT_CAPACITY: 1013,
  BAD_TOKEN: 4001,
  ROOM_FORBIDDEN: 4003,
  SLOW_CONSUMER: 4008,
  ROOM_FULL: 4009,
  RATE_LIMITED: 4029,
  BAD_REQUEST: 4400,
  REPLACED: 4409,
});

/**
 * Close codes after which reconnecting would only fail the same way (or, for
 * 4409, fight the newer connection of the same player); 1000 is a deliberate end.
 */
export const FINAL_CLOSE_CODES = new Set([1000, 1003, 1008, 1009, 4001, 4003, 4009, 4400, 4409]);

/** @param {number} code */
export function shouldReconnect(code) {
  return !FINAL_CLOSE_CODES.has(code);
}

/**
 * Close codes of a broken link rather than a verdict: the server may hold the
 * player's seat, so the reconnect asks to resume it (docs/protocol.md, Resume).
 */
export const RESUMABLE_CLOSE_CODES = new Set([1001, 1006, 1011, 1012, 1013, 4008]);

// --- client to server -----------------------------------------------------------

/** @param {number} seq @param {unknown} data */
export const event = (seq, data) => [MsgType.EVENT, seq, data];
/** @param {number} seq @param {string|number} key @param {unknown} data */
export const state = (seq, key, data) => [MsgType.STATE, seq, key, data];
/** @param {number} seq @param {number} toActor @param {unknown} data */
export const direct = (seq, toActor, data) => [MsgType.DIRECT, seq, toActor, data];
/** @param {number} clientTime */
export const ping = (clientTime) => [MsgType.PING, clientTime];

const encoder = new Encoder({ ignoreUndefined: true });

/** msgpack-encode one message. @param {unknown[]} message @returns {Uint8Array} */
export function encodeMessage(message) {
  return encoder.encode(message);
}

/**
 * Join encoded messages into as few frames as fit in maxFrameBytes each: the
 * protocol lets a frame carry several msgpack values back to back.
 * @param {Uint8Array[]} encoded
 * @param {number} [maxFrameBytes]
 * @returns {Uint8Array[]}
 */
export function packFrames(encoded, maxFrameBytes = Infinity) {
  /** @type {Uint8Array[]} */
  const frames = [];
  /** @type {Uint8Array[]} */
  let batch = [];
  let size = 0;
  const flush = () => {
    if (batch.length === 0) return;
    const frame = new Uint8Array(size);
    let at = 0;
    for (const part of batch) {
      frame.set(part, at);
      at += part.length;
    }
    frames.push(frame);
    batch = [];
    size = 0;
  };
  for (const part of encoded) {
    if (size > 0 && size + part.length > maxFrameBytes) flush();
    batch.push(part);
    size += part.length;
  }
  flush();
  return frames;
}

/** @param {unknown[][]} messages @param {number} [maxFrameBytes] */
export function encodeFrames(messages, maxFrameBytes) {
  return packFrames(messages.map(encodeMessage), maxFrameBytes);
}

// --- server to client -----------------------------------------------------------

// msgpack throws on a map key "__proto__", which would lose every other message
// batched into the same frame because one player put that key in its data. We
// rename it instead: such a key cannot be used safely in a JS object anyway.
// The hook sees every map key of that length (9 bytes) and only those.
export const PROTO_KEY = '\uFFFD__proto__';
const utf8 = new TextDecoder();
const keyDecoder = {
  canBeCached: (/** @type {number} */ n) => n === 9,
  decode(/** @type {Uint8Array} */ bytes, /** @type {number} */ at, /** @type {number} */ n) {
    const key = utf8.decode(bytes.subarray(at, at + n));
    return key === '__proto__' ? PROTO_KEY : key;
  },
};
const decoder = new Decoder({ keyDecoder });

/**
 * @typedef {{actor: number, player: string, meta: Record<string, any>}} Member
 * @typedef {Map<number, Record<string, any>>} Snapshot  actor -> key -> data
 * @typedef {{type: 'welcome', version: number, actor: number, room: string,
 *   members: Member[], snapshot: Snapshot, serverTime: number,
 *   limits: Record<string, number>, offset: number, epoch: string,
 *   resumeToken: string, lastSeq: number|null}} Welcome
 * @typedef {{type: 'event', from: number, seq: number, data: any, offset: number}} EventMsg
 * @typedef {{type: 'state', from: number, key: string|number, data: any, offset: number}} StateMsg
 * @typedef {{type: 'direct', from: number, seq: number, data: any}} DirectMsg
 * @typedef {{type: 'join', actor: number, player: string, meta: Record<string, any>,
 *   offset: number}} JoinMsg
 * @typedef {{type: 'leave', actor: number, code: number, offset: number}} LeaveMsg
 * @typedef {{type: 'error', seq: number|null, code: string, message: string}} ErrorMsg
 * @typedef {{type: 'dropped', count: number}} DroppedMsg
 * @typedef {{type: 'pong', clientTime: any, serverTime: number}} PongMsg
 * @typedef {Welcome|EventMsg|StateMsg|DirectMsg|JoinMsg|LeaveMsg|ErrorMsg|DroppedMsg|PongMsg}
 *   ServerMessage
 */

/** A plain object without a prototype, so no key can reach Object.prototype. */
function record(/** @type {any} */ value) {
  const out = Object.create(null);
  if (value && typeof value === 'object') Object.assign(out, value);
  return out;
}

/** @param {any} raw @returns {Snapshot} */
function decodeSnapshot(raw) {
  const snapshot = new Map();
  const entries = raw instanceof Map ? raw.entries() : Object.entries(raw ?? {});
  // Object keys are strings; actors are integers on the wire.
  for (const [actor, values] of entries) snapshot.set(Number(actor), record(values));
  return snapshot;
}

/** @param {any} m @returns {Member} */
const member = (m) => ({ actor: m[0], player: m[1], meta: m[2] ?? {} });

/**
 * Turn one server message (a decoded msgpack array) into an object.
 * Returns null for anything this client does not know, which the protocol
 * says to ignore; trailing elements are ignored by reading only what we know.
 * @param {unknown} m
 * @returns {ServerMessage|null}
 */
export function parseMessage(m) {
  if (!Array.isArray(m) || typeof m[0] !== 'number') return null;
  switch (m[0]) {
    case MsgType.WELCOME:
      return {
        type: 'welcome',
        version: m[1],
        actor: m[2],
        room: m[3],
        members: (m[4] ?? []).map(member),
        snapshot: decodeSnapshot(m[5]),
        serverTime: m[6],
        limits: m[7] ?? {},
        offset: m[8],
        epoch: m[9],
        resumeToken: m[10],
        lastSeq: m[11] ?? null,
      };
    case MsgType.EVENT:
      return { type: 'event', from: m[1], seq: m[2], data: m[3], offset: m[4] };
    case MsgType.STATE:
      return { type: 'state', from: m[1], key: m[2], data: m[3], offset: m[4] };
    case MsgType.DIRECT:
      return { type: 'direct', from: m[1], seq: m[2], data: m[3] };
    case MsgType.JOIN:
      return { type: 'join', actor: m[1], player: m[2], meta: m[3] ?? {}, offset: m[4] };
    case MsgType.LEAVE:
      return { type: 'leave', actor: m[1], code: m[2], offset: m[3] };
    case MsgType.ERROR:
      return { type: 'error', seq: m[1] ?? null, code: m[2], message: m[3] };
    case MsgType.DROPPED:
      return { type: 'dropped', count: m[1] };
    case MsgType.PONG:
      return { type: 'pong', clientTime: m[1], serverTime: m[2] };
    default:
      return null;
  }
}

/**
 * Decode one frame: every msgpack value in it, back to back.
 * Throws (RangeError, DecodeError) if the frame is not valid msgpack.
 * @param {ArrayBuffer|Uint8Array} frame
 * @returns {ServerMessage[]}
 */
export function decodeFrame(frame) {
  const out = [];
  for (const value of decoder.decodeMulti(frame)) {
    const message = parseMessage(value);
    if (message) out.push(message);
  }
  return out;
}
