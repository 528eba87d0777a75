// What a client knows about its room: the members and the snapshot, kept
// current by applying the server's messages in room order. No sockets.

/** @typedef {import('./codec.js').Member} Member */
/** @typedef {import('./codec.js').ServerMessage} ServerMessage */

export class RoomView {
  constructor() {
    /** @type {number|null} this player's actor */
    this.actor = null;
    /** @type {string|null} */
    this.room = null;
    /** @type {Map<number, Member>} actor -> member, this player included */
    this.members = new Map();
    /** @type {Map<number, Record<string, any>>} actor -> key -> data */
    this.snapshot = new Map();
    /** @type {number|null} the last room offset seen (for resume) */
    this.offset = null;
    /** @type {string|null} */
    this.epoch = null;
  }

  /** Start over from a WELCOME: everything before it is replaced. */
  reset(/** @type {import('./codec.js').Welcome} */ welcome) {
    this.actor = welcome.actor;
    this.room = welcome.room;
    this.members = new Map(welcome.members.map((m) => [m.actor, m]));
    this.snapshot = welcome.snapshot;
    this.offset = welcome.offset;
    this.epoch = welcome.epoch;
  }

  /**
   * Apply one room-ordered message (JOIN, LEAVE, STATE, EVENT); others pass.
   * Returns what the message changed, for the callbacks: the member that
   * joined or left, or the previous value of a STATE key.
   * @param {ServerMessage} msg
   */
  apply(msg) {
    if ('offset' in msg && typeof msg.offset === 'number') this.offset = msg.offset;
    switch (msg.type) {
      case 'join': {
        const joined = { actor: msg.actor, player: msg.player, meta: msg.meta };
        this.members.set(msg.actor, joined);
        return joined;
      }
      case 'leave': {
        const left = this.members.get(msg.actor);
        this.members.delete(msg.actor);
        this.snapshot.delete(msg.actor); // the protocol: its STATE keys are gone
        return left;
      }
      case 'state':
        return this.setState(msg.from, msg.key, msg.data);
      default:
        return undefined;
    }
  }

  /**
   * Set (or with data null, delete) one STATE key of an actor.
   * @param {number} actor @param {string|number} key @param {any} data
   * @returns {any} the previous value
   */
  setState(actor, key, data) {
    const values = this.snapshot.get(actor);
    const previous = values?.[key];
    if (data === null || data === undefined) {
      if (values) {
        delete values[key];
        if (Object.keys(values).length === 0) this.snapshot.delete(actor);
      }
    } else if (values) {
      values[key] = data;
    } else {
      // No prototype: any key a player sends is just a key.
      this.snapshot.set(actor, Object.assign(Object.create(null), { [key]: data }));
    }
    return previous;
  }
}
