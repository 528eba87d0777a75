// A stand-in for the browser's WebSocket: the test plays the server by
// pushing literal frames in and reading the frames the client sent.

import { encode } from '@msgpack/msgpack';

export class FakeSocket {
  /** @type {FakeSocket[]} every socket made, oldest first */
  static made = [];

  constructor(url) {
    this.url = url;
    this.readyState = 1; // OPEN at once: the relay's WELCOME is what the client waits for
    this.binaryType = 'blob';
    /** @type {Uint8Array[]} frames the client sent */
    this.sent = [];
    this.onmessage = null;
    this.onclose = null;
    this.onerror = null;
    FakeSocket.made.push(this);
  }

  static last() {
    return FakeSocket.made[FakeSocket.made.length - 1];
  }

  send(frame) {
    if (this.readyState !== 1) throw new Error('send on a socket that is not open');
    this.sent.push(frame);
  }

  close(code = 1000, reason = '') {
    if (this.readyState === 3) return;
    this.readyState = 3;
    queueMicrotask(() => this.onclose?.({ code, reason }));
  }

  /** Deliver one frame holding these messages, encoded back to back. */
  push(...messages) {
    this.pushBytes(concat(messages.map((m) => encode(m))));
  }

  pushBytes(bytes) {
    // A real socket with binaryType 'arraybuffer' hands over an ArrayBuffer.
    const buffer = bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.byteLength);
    this.onmessage?.({ data: buffer });
  }

  /** The connection fails with an error event and no close event (Node 20's WebSocket). */
  fail() {
    this.readyState = 3;
    this.onerror?.({ type: 'error' });
  }

  /** The server (or the network) ends the connection. */
  drop(code, reason = '') {
    this.readyState = 3;
    this.onclose?.({ code, reason });
  }
}

export function concat(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) {
    out.set(p, at);
    at += p.length;
  }
  return out;
}

/** Wait until cond() is true, polling; fail after timeoutMs. */
export async function until(cond, timeoutMs = 2000, what = 'condition') {
  const deadline = Date.now() + timeoutMs;
  while (!cond()) {
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 2));
  }
}

/** A WELCOME as the relay sends it; override any field. */
export function welcome({
  actor = 2,
  room = 'grid:test',
  members = [
    [1, 'p-one', { name: 'One' }],
    [2, 'p-two', { name: 'Two' }],
  ],
  snapshot = { 1: { pos: [3, 4] } },
  offset = 10,
  limits = { max_frame_bytes: 16384, max_msgs_per_s: 120 },
  epoch = 'epoch-1',
  resumeToken = 'resume-x',
  lastSeq = null,
} = {}) {
  return [
    0,
    1,
    actor,
    room,
    members,
    snapshot,
    1700000000000,
    limits,
    offset,
    epoch,
    resumeToken,
    lastSeq,
  ];
}
