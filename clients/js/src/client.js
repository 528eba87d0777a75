// The relay browser client: one WebSocket to one room, the room's members and
// snapshot kept current, batched sends, ping, and reconnect with backoff that
// resumes the player's seat (docs/protocol.md, Resume).
//
//   const client = await connect({ room: 'grid:lobby', name: 'Ada' });
//   client.on('state', ({ from, key, data }) => draw(from, key, data));
//   client.sendState('pos', [3, 4]);

import * as codec from './codec.js';
import { RoomView } from './room.js';

export { codec, RoomView };
export {
  CloseCode,
  MsgType,
  FINAL_CLOSE_CODES,
  RESUMABLE_CLOSE_CODES,
  shouldReconnect,
} from './codec.js';

const ROOM_ID = /^[A-Za-z0-9_.:-]{1,64}$/;

/** How many of its own moves (EVENT, STATE, DIRECT) the client keeps to re-send after a resume. */
export const RESEND_BUFFER = 1024;

/** How long after a socket's error event its close event may take before the client ends it. */
const ERROR_GRACE_MS = 250;

/**
 * One of this client's own moves, kept until the server is known to have it.
 * @typedef {{seq: number, bytes: Uint8Array, state?: {key: string|number, data: any}, direct?: boolean}} SentMove
 */

/**
 * The seat a reconnect asks for: the token and the place in the room's order.
 * @typedef {{token: string, actor: number, offset: number, epoch: string, player?: string}}
 *   ResumePoint
 */

/**
 * @typedef {object} ConnectOptions
 * @property {string} room  1-64 characters from A-Z a-z 0-9 _ . : -
 * @property {string} [url]  the relay's base URL, http(s) or ws(s); default: the page's origin
 * @property {string[]} [urls]  instead of `url`, every relay node that shares the room
 *   (Redis): a reconnect moves on to the next when a node goes away (1001) or fails
 * @property {string} [player]  player id (servers without a token secret only)
 * @property {string} [name]  display name, carried in the member's meta
 * @property {string | (() => string)} [token]  signed token naming the player; a function
 *   is asked for a fresh one on every (re)connect, so a session can outlive its first token
 * @property {boolean} [echo]  also receive this player's own EVENT/STATE, in room order
 * @property {boolean} [reconnect]  reconnect after a break (default true)
 * @property {number} [backoffMs]  first reconnect delay (default 250), doubled per failed try
 * @property {number} [maxBackoffMs]  longest reconnect delay (default 8000)
 * @property {typeof WebSocket} [WebSocket]  the WebSocket class (default: the global one)
 */

/**
 * What each callback receives.
 * @typedef {object} ClientEvents
 * @property {import('./codec.js').Welcome} welcome  every WELCOME, also after a reconnect
 * @property {{from: number, seq: number, data: any, offset: number}} event
 * @property {{from: number, key: string|number, data: any, previous: any, offset: number}} state
 * @property {{from: number, seq: number, data: any}} direct
 * @property {import('./codec.js').Member & {offset: number}} join
 * @property {import('./codec.js').Member & {code: number, offset: number}} leave
 * @property {{seq: number|null, code: string, message: string}} error  an ERROR from the
 *   server, or code 'undecodable' for a frame this client could not read
 * @property {{count: number, total: number}} dropped
 * @property {{code: number, reason: string, willReconnect: boolean}} close
 * @property {{attempt: number, delayMs: number}} reconnecting
 * @property {{actor: number, offset: number}} resumed  took the seat back after a break with
 *   nothing missed: members and snapshot were kept, and the missed messages follow
 * @property {{actor: number, previousActor: number|null, unsentDirects: number[]}} resynced
 *   rejoined after a break, with a fresh snapshot (the actor changes when the seat was
 *   gone); unsentDirects: the seqs of DIRECTs that had not left when the room started
 *   a new epoch, where actors are numbered anew, so they were not sent
 */

/**
 * Raised by connect() when the server closes before WELCOME, and by send calls
 * before the first WELCOME or once the client is closed.
 */
export class RelayError extends Error {
  /** @param {string} message @param {number} [code] @param {string} [reason] */
  constructor(message, code, reason = '') {
    super(message);
    this.name = 'RelayError';
    /** the WebSocket close code, when a close caused this */
    this.code = code;
    this.reason = reason;
  }
}

/**
 * Join a room. Resolves once WELCOME arrives; rejects with a RelayError
 * carrying the close code and reason if the server refuses the connection.
 * @param {ConnectOptions} options
 * @returns {Promise<RelayClient>}
 */
export async function connect(options) {
  const client = new RelayClient(options);
  await client.ready;
  return client;
}

/** Build the WebSocket URL of a room. @param {ConnectOptions} o */
export function socketUrl(o) {
  if (!ROOM_ID.test(o.room ?? '')) {
    throw new TypeError(
      `room must be 1-64 characters from A-Z a-z 0-9 _ . : -, not ${JSON.stringify(o.room)}`,
    );
  }
  const origin = o.url ?? globalThis.location?.origin;
  if (!origin)
    throw new TypeError('url is required outside a page served by the relay (e.g. in Node)');
  const url = new URL(origin);
  url.protocol = url.protocol.replace(/^http/, 'ws'); // http: -> ws:, https: -> wss:
  url.pathname = `${url.pathname.replace(/\/$/, '')}/ws/${o.room}`;
  url.search = '';
  if (typeof o.token === 'string' && o.token) url.searchParams.set('token', o.token);
  if (o.player) url.searchParams.set('player', o.player);
  if (o.name) url.searchParams.set('name', o.name);
  if (o.echo) url.searchParams.set('echo', '1');
  return url.href;
}

export class RelayClient {
  /** @param {ConnectOptions} options */
  constructor(options) {
    this.options = { reconnect: true, backoffMs: 250, maxBackoffMs: 8000, ...options };
    if (typeof (this.options.WebSocket ?? globalThis.WebSocket) !== 'function')
      throw new TypeError(
        'no WebSocket here: pass options.WebSocket, or use Node 22+ (Node 20: --experimental-websocket)',
      );
    const bases = this.options.urls?.length ? this.options.urls : [this.options.url];
    /** The room's socket URL on each node; a resume token works on any of them. */
    this.urls = bases.map((url) => socketUrl({ ...this.options, url }));
    this._at = 0; // the node of the current (or next) connection
    this._firstTries = 1; // nodes tried by the first connect; it tries each once
    /** @type {'connecting'|'open'|'reconnecting'|'closed'} */
    this.status = 'connecting';
    this.view = new RoomView();
    /** EVENTs (and DIRECTs) the server dropped for this client: it read too slowly, or its seat was held. */
    this.droppedTotal = 0;
    /** @type {Record<string, number>} the limits in force, from WELCOME */
    this.limits = {};
    this._seq = 0; // strictly increasing for the client's life, across reconnects
    /** The highest seq handed to an open socket: the moves after it certainly never left. */
    this._wiredSeq = 0;
    /** @type {SentMove[]} own moves, oldest first, at most RESEND_BUFFER, to re-send after a resume */
    this._sent = [];
    /** @type {Array<{bytes: Uint8Array, seq: number}>} encoded messages for the next frame (seq 0: PING) */
    this._pending = [];
    /** @type {string|null} from the last WELCOME */
    this._resumeToken = null;
    /** @type {ResumePoint|null} what the reconnect under way asks to resume */
    this._resumeFrom = null;
    this._flushQueued = false;
    /** @type {Map<number, Array<{resolve: (ms: number) => void, reject: (e: Error) => void}>>} */
    this._pings = new Map();
    /** @type {Map<string, Set<Function>>} */
    this._handlers = new Map();
    this._attempt = 0;
    this._welcomed = false;
    this._closedByUser = false;
    /** @type {ReturnType<typeof setTimeout>|undefined} */
    this._timer = undefined;
    /** Resolves on the first WELCOME. @type {Promise<RelayClient>} */
    this.ready = new Promise((resolve, reject) => {
      this._resolveReady = resolve;
      this._rejectReady = reject;
    });
    this.ready.catch(() => {}); // connect() surfaces it; an unawaited client must not warn
    this._open();
  }

  /** The room's socket URL on the node in use. */
  get url() {
    return this.urls[this._at];
  }

  /** This player's actor in the room (it may change after a reconnect). */
  get actor() {
    return this.view.actor;
  }
  get room() {
    return this.view.room;
  }
  /** actor -> {actor, player, meta}, this player included. */
  get members() {
    return this.view.members;
  }
  /** actor -> {key: data}: every member's latest STATE values. */
  get snapshot() {
    return this.view.snapshot;
  }
  /** The last room offset seen. */
  get offset() {
    return this.view.offset;
  }

  /**
   * Call fn for every message or change of the given kind; returns a function that unsubscribes.
   * @template {keyof ClientEvents} K
   * @param {K} type @param {(e: ClientEvents[K]) => void} fn
   */
  on(type, fn) {
    if (!this._handlers.has(type)) this._handlers.set(type, new Set());
    this._handlers.get(type)?.add(fn);
    return () => this.off(type, fn);
  }

  /** @template {keyof ClientEvents} K @param {K} type @param {(e: ClientEvents[K]) => void} fn */
  off(type, fn) {
    this._handlers.get(type)?.delete(fn);
  }

  /**
   * Send an ordered move to every other member. @returns {number} its seq
   *
   * While the client is reconnecting, this and the other send calls queue the
   * move: it goes out after the next WELCOME (see Resume in the README).
   */
  sendEvent(/** @type {any} */ data) {
    const seq = this._nextSeq();
    this._queueMove(seq, codec.event(seq, data));
    return seq;
  }

  /**
   * Set this player's value under key (data null deletes it); kept in the room snapshot.
   * @param {string|number} key @param {any} data @returns {number} its seq
   */
  sendState(key, data) {
    const seq = this._nextSeq();
    this._queueMove(seq, codec.state(seq, key, data), { key, data });
    // Without echo the server will not send it back, so keep our copy current here.
    if (!this.options.echo && this.view.actor !== null)
      this.view.setState(this.view.actor, key, data);
    return seq;
  }

  /**
   * Send a move to one member only.
   * @param {number} toActor @param {any} data @returns {number} its seq
   */
  sendDirect(toActor, data) {
    const seq = this._nextSeq();
    this._queueMove(seq, codec.direct(seq, toActor, data), undefined, true);
    return seq;
  }

  /**
   * Round-trip time to the server, in ms. Rejects if the connection closes first.
   * @returns {Promise<number>}
   */
  ping() {
    if (this.status !== 'open')
      return Promise.reject(new RelayError(`not connected (status: ${this.status})`));
    const sentAt = performance.now();
    return new Promise((resolve, reject) => {
      const waiting = this._pings.get(sentAt);
      if (waiting) return waiting.push({ resolve, reject }); // same instant: one PING answers both
      this._pings.set(sentAt, [{ resolve, reject }]);
      this._queue(codec.encodeMessage(codec.ping(sentAt)));
    });
  }

  /** Leave the room for good: no reconnect. A browser accepts code 1000 or 3000-4999. */
  close(code = 1000, reason = '') {
    this._closedByUser = true;
    clearTimeout(this._timer);
    if (this.socket && this.socket.readyState <= 1) {
      this._flush(); // what was sent before close() still goes out
      this.socket.close(code, reason);
    } else {
      this._finish(code, reason);
    }
  }

  // --- internals ------------------------------------------------------------------

  _nextSeq() {
    if (this.status === 'reconnecting') {
      // Queued for after the resume; bounded, so that none of them falls out of the buffer.
      if (this._seq - this._wiredSeq >= RESEND_BUFFER)
        throw new RelayError(
          `not connected (status: reconnecting), and ${RESEND_BUFFER} moves already wait`,
        );
    } else if (this.status !== 'open') {
      throw new RelayError(`not connected (status: ${this.status})`);
    }
    return ++this._seq;
  }

  /**
   * Keep an own move for re-sending; send it now when open, else after the next WELCOME.
   * @param {number} seq @param {unknown[]} message @param {SentMove['state']} [state]
   * @param {boolean} [direct]
   */
  _queueMove(seq, message, state, direct = false) {
    const bytes = codec.encodeMessage(message);
    this._sent.push(
      state ? { seq, bytes, state } : direct ? { seq, bytes, direct } : { seq, bytes },
    );
    if (this._sent.length > RESEND_BUFFER) this._sent.shift();
    if (this.status === 'open') this._queue(bytes, seq);
  }

  /** Messages wait for the end of the current task, then go out together as one frame. */
  _queue(/** @type {Uint8Array} */ bytes, seq = 0) {
    this._pending.push({ bytes, seq });
    if (this._flushQueued) return;
    this._flushQueued = true;
    queueMicrotask(() => this._flush());
  }

  _flush() {
    this._flushQueued = false;
    if (this._pending.length === 0) return;
    const pending = this._pending;
    this._pending = [];
    // A socket that broke meanwhile discards these: the moves wait in _sent for the
    // resume, and the pings were rejected by the close.
    if (this.socket?.readyState !== 1) return;
    const bytes = pending.map((p) => p.bytes);
    for (const frame of codec.packFrames(bytes, this.limits.max_frame_bytes ?? Infinity))
      this.socket.send(frame);
    for (const p of pending) if (p.seq > this._wiredSeq) this._wiredSeq = p.seq;
  }

  _open() {
    const Socket = this.options.WebSocket ?? globalThis.WebSocket;
    const from = this._resumeFrom;
    const url = new URL(from ? this._resumeUrl(from) : this.url);
    if (typeof this.options.token === 'function')
      url.searchParams.set('token', this.options.token());
    const socket = new Socket(url.href);
    socket.binaryType = 'arraybuffer';
    let ended = false;
    const end = (/** @type {number} */ code, /** @type {string} */ reason) => {
      if (ended || this.socket !== socket) return;
      ended = true;
      this._onClose(code, reason);
    };
    socket.onmessage = (ev) => this.socket === socket && this._onFrame(ev.data);
    socket.onclose = (ev) => end(ev.code, ev.reason);
    // A browser follows an error with close (1006). Node 20's WebSocket fires no close
    // after a refused connection, which would leave the client waiting for ever.
    socket.onerror = () => {
      setTimeout(() => {
        if (ended) return;
        try {
          socket.close();
        } catch {
          // already closed, or never opened
        }
        end(1006, '');
      }, ERROR_GRACE_MS);
    };
    this.socket = socket;
  }

  _onFrame(/** @type {unknown} */ data) {
    // The relay sends binary frames only.
    if (!(data instanceof ArrayBuffer || ArrayBuffer.isView(data))) return;
    let messages;
    try {
      messages = codec.decodeFrame(/** @type {ArrayBuffer} */ (data));
    } catch (err) {
      this._emit('error', {
        seq: null,
        code: 'undecodable',
        message: `frame is not valid msgpack: ${err}`,
      });
      return;
    }
    for (const msg of messages) this._onMessage(msg);
  }

  _onMessage(/** @type {import('./codec.js').ServerMessage} */ msg) {
    switch (msg.type) {
      case 'welcome':
        return this._onWelcome(msg);
      case 'event': {
        this.view.apply(msg);
        return this._emit('event', {
          from: msg.from,
          seq: msg.seq,
          data: msg.data,
          offset: msg.offset,
        });
      }
      case 'state': {
        const previous = this.view.apply(msg);
        return this._emit('state', {
          from: msg.from,
          key: msg.key,
          data: msg.data,
          previous,
          offset: msg.offset,
        });
      }
      case 'direct':
        return this._emit('direct', { from: msg.from, seq: msg.seq, data: msg.data });
      case 'join':
        return this._emit('join', { ...this.view.apply(msg), offset: msg.offset });
      case 'leave': {
        const left = this.view.apply(msg) ?? { actor: msg.actor, player: '', meta: {} };
        return this._emit('leave', { ...left, code: msg.code, offset: msg.offset });
      }
      case 'error':
        // Refused for good: never re-sent after a resume (where rules might take it, out of its time).
        if (msg.seq !== null) this._sent = this._sent.filter((m) => m.seq !== msg.seq);
        return this._emit('error', { seq: msg.seq, code: msg.code, message: msg.message });
      case 'dropped': {
        this.droppedTotal += msg.count;
        return this._emit('dropped', { count: msg.count, total: this.droppedTotal });
      }
      case 'pong': {
        const waiting = this._pings.get(msg.clientTime);
        if (!waiting) return;
        this._pings.delete(msg.clientTime);
        const rtt = performance.now() - msg.clientTime;
        for (const p of waiting) p.resolve(rtt);
      }
    }
  }

  _onWelcome(/** @type {import('./codec.js').Welcome} */ welcome) {
    const previousActor = this.view.actor;
    const rejoined = this._welcomed;
    const from = this._resumeFrom;
    this._resumeFrom = null;
    // Actors are never reused within an epoch: the same actor is the same seat,
    // and the server has its moves up to lastSeq. A new seat has none of the old one's.
    const sameEpoch = welcome.epoch === this.view.epoch;
    const sameSeat = rejoined && welcome.actor === previousActor && sameEpoch;
    // Exact: the server replays every room message after the offset asked for, so
    // the members and snapshot this client has stay right as it applies them.
    const exact =
      from !== null &&
      welcome.actor === from.actor &&
      welcome.epoch === from.epoch &&
      welcome.offset === from.offset;
    if (!exact) this.view.reset(welcome);
    this.limits = welcome.limits;
    this._resumeToken = typeof welcome.resumeToken === 'string' ? welcome.resumeToken : null;
    this.status = 'open';
    this._attempt = 0;
    this._welcomed = true;
    // A DIRECT names its recipient by actor: in a new epoch that may be anyone.
    /** @type {number[]} */
    const unsentDirects = [];
    if (rejoined && !sameEpoch)
      this._sent = this._sent.filter((m) => {
        if (m.direct && m.seq > this._wiredSeq) unsentDirects.push(m.seq);
        return !m.direct;
      });
    // On a new seat only the moves that never left go out (the others may have
    // been applied by the old seat already).
    if (rejoined) this._resend(sameSeat ? (welcome.lastSeq ?? 0) : this._wiredSeq, !exact);
    this._emit('welcome', welcome);
    if (!rejoined) this._resolveReady(this);
    else if (exact) this._emit('resumed', { actor: welcome.actor, offset: welcome.offset });
    else this._emit('resynced', { actor: welcome.actor, previousActor, unsentDirects });
  }

  /**
   * After a reconnect's WELCOME: re-send, in order and ahead of anything else,
   * the own moves with a seq greater than `after`, and forget the others.
   * @param {number} after @param {boolean} fresh  the snapshot came from WELCOME
   */
  _resend(after, fresh) {
    this._sent = this._sent.filter((m) => m.seq > after);
    if (this._sent.length === 0) return;
    const again = this._sent.map((m) => ({ bytes: m.bytes, seq: m.seq }));
    this._pending = [...again, ...this._pending];
    if (!this._flushQueued) {
      this._flushQueued = true;
      queueMicrotask(() => this._flush());
    }
    // A fresh snapshot predates these STATEs; without echo none comes back to say so.
    if (fresh && !this.options.echo && this.view.actor !== null)
      for (const m of this._sent)
        if (m.state) this.view.setState(this.view.actor, m.state.key, m.state.data);
  }

  /** Where a reconnect should take the seat back from; null when it cannot. @returns {ResumePoint|null} */
  _resumePoint() {
    const { actor, offset, epoch } = this.view;
    const token = this._resumeToken;
    if (!token || actor === null || offset === null || epoch === null) return null;
    return { token, actor, offset, epoch, player: this.view.members.get(actor)?.player };
  }

  /** The socket URL with resume, offset and epoch, and this seat's player id. @param {ResumePoint} from */
  _resumeUrl(from) {
    const url = new URL(this.url);
    if (from.player) url.searchParams.set('player', from.player);
    url.searchParams.set('resume', from.token);
    url.searchParams.set('offset', String(from.offset));
    url.searchParams.set('epoch', from.epoch);
    return url.href;
  }

  _onClose(/** @type {number} */ code, /** @type {string} */ reason) {
    this._pending = [];
    for (const waiting of this._pings.values()) {
      for (const p of waiting)
        p.reject(new RelayError(`connection closed (${code})`, code, reason));
    }
    this._pings.clear();
    // The first connect tries each node once, at once (a node may be down or full),
    // then reports the last refusal through connect(); a verdict (a bad token, a bad
    // request) is reported at once. Later breaks are retried.
    if (
      !this._welcomed &&
      !this._closedByUser &&
      this._firstTries < this.urls.length &&
      codec.shouldReconnect(code)
    ) {
      this._firstTries += 1;
      this._at = (this._at + 1) % this.urls.length;
      return this._open();
    }
    const willReconnect =
      !this._closedByUser &&
      this._welcomed &&
      this.options.reconnect &&
      codec.shouldReconnect(code);
    if (!willReconnect) return this._finish(code, reason);
    // A connection that had its WELCOME broke: after a broken link (not a verdict)
    // the server may hold the seat, so ask for it back. A retry that failed before
    // its WELCOME keeps asking for what the break left.
    if (this.status === 'open')
      this._resumeFrom = codec.RESUMABLE_CLOSE_CODES.has(code) ? this._resumePoint() : null;
    // A node going away, or one that failed the retry: the next node may serve the seat.
    if (code === 1001 || this.status === 'reconnecting')
      this._at = (this._at + 1) % this.urls.length;
    this.status = 'reconnecting';
    this._emit('close', { code, reason, willReconnect });
    const delayMs = this._backoff();
    this._attempt += 1;
    this._emit('reconnecting', { attempt: this._attempt, delayMs });
    this._timer = setTimeout(() => this._open(), delayMs);
  }

  /** Exponential backoff with jitter, so a restarted server is not hit by everyone at once. */
  _backoff() {
    const { backoffMs, maxBackoffMs } = this.options;
    const ceiling = Math.min(maxBackoffMs ?? 8000, (backoffMs ?? 250) * 2 ** this._attempt);
    return Math.round(ceiling * (0.5 + Math.random() / 2));
  }

  _finish(/** @type {number} */ code, /** @type {string} */ reason) {
    const wasClosed = this.status === 'closed';
    this.status = 'closed';
    if (!this._welcomed) {
      const why = reason ? `: ${reason}` : '';
      this._rejectReady(
        new RelayError(`relay closed the connection with ${code}${why}`, code, reason),
      );
    }
    if (!wasClosed) this._emit('close', { code, reason, willReconnect: false });
  }

  /** @param {string} type @param {any} payload */
  _emit(type, payload) {
    for (const fn of this._handlers.get(type) ?? []) {
      try {
        fn(payload);
      } catch (err) {
        // One failing callback must not stop the others or the messages after it;
        // reportError shows it in the console like an uncaught error would.
        if (typeof globalThis.reportError === 'function') globalThis.reportError(err);
        else console.error(err);
      }
    }
  }
}
