// The grid arena: each player is a marker on a 20 x 15 board. A player's cell
// is its STATE "pos" = [x, y]; a boom is the EVENT {t: "boom", x, y}.
//
// The relay enforces the grid rules (relay/rules/grid.py): a player appears on
// any free cell, then moves one step at a time (up, down, left, right) and never
// onto another player; a move against them is answered with ERROR "rejected" and
// not relayed. So a click sets a target the marker walks to, one step per STEP_MS
// along a path around the other players, and the page keeps one move in flight:
// it joins with echo, so its own STATE comes back in room order and confirms the
// move, or an ERROR refuses it and the marker goes back to the last confirmed cell.
//
// Every marker is drawn from the client's snapshot, so what you see is what the
// room holds; only our own marker may stand one step ahead, on the move in flight
// (data-pending). Markers carry data-actor / data-x / data-y for tests.

import { RelayClient } from '/client.js';

const COLS = 20;
const ROWS = 15;
const STEP_MS = 70; // the walking pace: at most one step per STEP_MS
const PLACE_TRIES = 5; // cells tried on joining when the relay refuses one (a race)
const MOVES = {
  ArrowLeft: [-1, 0],
  ArrowRight: [1, 0],
  ArrowUp: [0, -1],
  ArrowDown: [0, 1],
  a: [-1, 0],
  d: [1, 0],
  w: [0, -1],
  s: [0, 1],
};
const NEIGHBOURS = [
  [1, 0],
  [-1, 0],
  [0, 1],
  [0, -1],
];

/** @typedef {[number, number]} Cell */

const params = new URLSearchParams(location.search);
const room = params.get('room') || 'grid:lobby';
const name = params.get('name') || randomName();
const token = params.get('token') || undefined; // for a relay with --secret (`relay token`)

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const arena = $('arena');
const statusEl = $('status');
$('room').textContent = room;
document.title = `${name} · ${room} · relay`;

let client;
try {
  // echo: our own STATE and EVENT come back in room order, which confirms a move.
  client = new RelayClient({ room, name, echo: true, token });
} catch (err) {
  setStatus('closed', String(err.message ?? err));
  throw err;
}
let resyncs = 0;

/** Our last cell the relay confirmed; kept across reconnects to rejoin there. @type {Cell|null} */
let mine = null;
/** The one move in flight: its seq (an ERROR names it) and cell. @type {{seq: number, cell: Cell}|null} */
let pending = null;
/** Where a click or a key asked to go; null when not walking. @type {Cell|null} */
let target = null;
let byKeys = false; // the target was set by the keys, not a click
let lastStepAt = -Infinity;
/** @type {ReturnType<typeof setTimeout>|undefined} */
let stepTimer;
let placeTries = 0;

client.on('welcome', () => {
  setStatus('open', 'connected');
  halt();
  pending = null;
  placeTries = 0;
  // A fresh join holds no position of ours: keep the old cell if it is free,
  // otherwise take a free one (the relay refuses a taken one anyway).
  const held = confirmed();
  if (held) mine = held;
  else place(mine && !occupied(mine) ? mine : freeCell());
  renderMembers();
  render();
  measure();
  log(`joined ${room} as actor ${client.actor}`);
});
client.on('resynced', ({ actor, previousActor }) => {
  resyncs += 1;
  statusEl.dataset.resyncs = String(resyncs);
  log(`rejoined: actor ${previousActor} → ${actor}, fresh snapshot`);
});
// A client that resumes its seat after a break (same actor, nothing missed) says
// 'resumed' instead; the relay kept our cell, so WELCOME above found it confirmed.
client.on('resumed', ({ actor }) => {
  log(`resumed as actor ${actor}, nothing missed`);
});
client.on('state', ({ from, key, data }) => {
  if (key !== 'pos') return;
  if (from === client.actor) {
    // Our move came back in room order: the relay took it. One is in flight at a
    // time, so this is the pending one; walk on.
    pending = null;
    if (isCell(data)) mine = data;
    schedule();
  }
  render();
});
client.on('event', ({ from, data }) => {
  if (data?.t === 'boom') ring(from, data.x, data.y); // ours too: echo sends it back
});
client.on('join', (m) => {
  log(`${label(m)} joined`);
  renderMembers();
});
client.on('leave', (m) => {
  log(`${label(m)} left (${m.code})`);
  renderMembers();
  render();
});
client.on('dropped', ({ total }) => {
  $('dropped').textContent = String(total);
});
client.on('error', ({ seq, code, message }) => {
  if (!pending || seq !== pending.seq) {
    log(`error ${code}: ${message}`);
    return;
  }
  // The move in flight was refused (code "rejected": against the grid rules) and
  // not relayed: the relay still has us on the last confirmed cell.
  const refused = pending.cell;
  pending = null;
  const placing = !confirmed();
  log(`${placing ? 'place on' : 'move to'} ${fmt(refused)} refused (${code}): ${message}`);
  if (placing) {
    // Not on the board yet: another player took that cell a moment before us.
    if (++placeTries < PLACE_TRIES && client.status === 'open') place(freeCell(refused));
    else {
      log('no free cell was accepted; reload to try again');
      render();
    }
    return;
  }
  halt();
  render();
  flash();
});
let lastClose = 0;
client.on('close', ({ code, reason, willReconnect }) => {
  lastClose = code;
  halt();
  pending = null; // whatever was in flight went into the break
  render();
  log(`connection closed: ${code}${reason ? ` ${reason}` : ''}`);
  if (!willReconnect) setStatus('closed', `closed: ${code}${reason ? ` ${reason}` : ''}`);
});
client.on('reconnecting', ({ attempt }) => {
  setStatus('reconnecting', `reconnecting… (closed ${lastClose}, try ${attempt})`);
});
client.ready.catch(() => {}); // the 'close' callback has shown why

// --- the board ----------------------------------------------------------------------

/** A position is drawn or walked to only if it is a cell of this board. */
function isCell(/** @type {any} */ pos) {
  return (
    Array.isArray(pos) &&
    Number.isInteger(pos[0]) &&
    Number.isInteger(pos[1]) &&
    pos[0] >= 0 &&
    pos[1] >= 0 &&
    pos[0] < COLS &&
    pos[1] < ROWS
  );
}

const same = (/** @type {Cell} */ a, /** @type {Cell} */ b) => a[0] === b[0] && a[1] === b[1];
const cellKey = (/** @type {Cell} */ c) => `${c[0]},${c[1]}`; // a cell as a Map key
const fmt = (/** @type {Cell} */ c) => `${c[0]}, ${c[1]}`; // a cell as the page shows it

/** Our cell as the relay has it (from our own STATE, echoed back), or null. @returns {Cell|null} */
function confirmed() {
  const pos = client.actor === null ? null : client.snapshot.get(client.actor)?.pos;
  return isCell(pos) ? pos : null;
}

/** Everyone's cells but ours, as the room holds them: "x,y" -> actor. */
function others() {
  const cells = new Map();
  for (const [actor, values] of client.snapshot) {
    if (actor !== client.actor && isCell(values.pos)) cells.set(cellKey(values.pos), actor);
  }
  return cells;
}

const occupied = (/** @type {Cell} */ cell) => others().has(cellKey(cell));

/** A random free cell, other than `avoid` (the board has room for far more than a room's members). */
function freeCell(/** @type {Cell|null} */ avoid = null) {
  const taken = others();
  if (avoid) taken.set(cellKey(avoid), -1);
  /** @type {Cell[]} */
  const free = [];
  for (let y = 0; y < ROWS; y++) {
    for (let x = 0; x < COLS; x++) if (!taken.has(cellKey([x, y]))) free.push([x, y]);
  }
  return free[Math.floor(Math.random() * free.length)];
}

/**
 * The first step of a shortest path from `from` to `to` around the other players,
 * or null when they wall it off. Breadth-first from `to`: the cell from which the
 * search first reaches `from` is the step to take.
 * @param {Cell} from @param {Cell} to @returns {Cell|null}
 */
function firstStep(from, to) {
  const taken = others();
  const seen = new Set([cellKey(to)]);
  /** @type {Cell[]} */
  const queue = [to];
  for (let i = 0; i < queue.length; i++) {
    const here = queue[i];
    for (const [dx, dy] of NEIGHBOURS) {
      /** @type {Cell} */
      const next = [here[0] + dx, here[1] + dy];
      if (same(next, from)) return here;
      const key = cellKey(next);
      if (!isCell(next) || seen.has(key) || taken.has(key)) continue;
      seen.add(key);
      queue.push(next);
    }
  }
  return null;
}

// --- moves --------------------------------------------------------------------------

/** Send a move to `cell` and show it as in flight until the relay answers. */
function send(/** @type {Cell} */ cell) {
  pending = { seq: client.sendState('pos', cell), cell };
  lastStepAt = performance.now();
  render();
}

/** Appear on a cell: the first position may be any free one. */
function place(/** @type {Cell} */ cell) {
  send(cell);
}

/** Walk to `cell`: a click, or a key's step (quiet about the edge and other players). */
function goTo(/** @type {Cell} */ cell, keyStep = false) {
  if (client.status !== 'open' || !confirmed() || !isCell(cell)) return;
  if (occupied(cell)) {
    if (!keyStep) log(`${fmt(cell)} is taken`);
    return;
  }
  target = cell;
  byKeys = keyStep;
  schedule();
  renderCell();
}

/** Stop walking. */
function halt() {
  target = null;
  clearTimeout(stepTimer);
  stepTimer = undefined;
  renderCell();
}

/** Take the next step when the last is confirmed and STEP_MS has passed since it was sent. */
function schedule() {
  clearTimeout(stepTimer);
  stepTimer = undefined;
  if (!target || pending) return;
  stepTimer = setTimeout(walk, Math.max(0, lastStepAt + STEP_MS - performance.now()));
}

function walk() {
  stepTimer = undefined;
  const here = confirmed();
  if (!target || pending || client.status !== 'open' || !here) return;
  if (same(here, target)) return halt();
  if (occupied(target)) {
    log(`${fmt(target)} was taken: stopped at ${fmt(here)}`);
    return halt();
  }
  const next = firstStep(here, target);
  if (!next) {
    log(`no way to ${fmt(target)}: stopped at ${fmt(here)}`);
    return halt();
  }
  send(next);
}

function boom() {
  const here = confirmed();
  if (client.status !== 'open' || !here) return;
  client.sendEvent({ t: 'boom', x: here[0], y: here[1] });
}

window.addEventListener('keydown', (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === ' ') {
    e.preventDefault();
    if (!e.repeat) boom();
    return;
  }
  const step = MOVES[e.key.length === 1 ? e.key.toLowerCase() : e.key];
  const here = pending?.cell ?? confirmed();
  if (!step || !here) return;
  e.preventDefault();
  // One step on. Quick presses queue their steps (each press is one), but a held
  // key's repeats step on from where we are, so they do not pile up.
  const from = !e.repeat && byKeys && target ? target : here;
  goTo([from[0] + step[0], from[1] + step[1]], true);
});

arena.addEventListener('click', (e) => {
  const box = arena.getBoundingClientRect();
  const cell = box.width / COLS;
  goTo([
    Math.floor((e.clientX - box.left - arena.clientLeft) / cell),
    Math.floor((e.clientY - box.top - arena.clientTop) / cell),
  ]);
});

$('boom').addEventListener('click', (e) => {
  boom();
  /** @type {HTMLElement} */ (e.currentTarget).blur(); // so Space does not press it again
});

/** Show the round-trip time: once on joining, then every 2 s. */
async function measure() {
  if (client.status !== 'open') return;
  try {
    $('rtt').textContent = `${(await client.ping()).toFixed(1)} ms`;
  } catch {
    // the connection broke meanwhile; the status line says so
  }
}
setInterval(measure, 2000);

// --- drawing ------------------------------------------------------------------------

const color = (/** @type {number} */ actor) =>
  `hsl(${Math.round((actor * 137.508) % 360)} 75% 60%)`;
const label = (/** @type {{actor: number, meta?: any}} */ m) =>
  `${m.meta?.name || 'anonymous'} (${m.actor})`;
const nameOf = (/** @type {number} */ actor) =>
  client.members.get(actor)?.meta?.name || `#${actor}`;

/** Draw a marker for every member with a position, and only those. */
function render() {
  /** @type {Map<number, Cell>} */
  const cells = new Map();
  for (const [actor, values] of client.snapshot) {
    if (actor !== client.actor && isCell(values.pos)) cells.set(actor, values.pos);
  }
  // Ours: the move in flight, else the cell the relay confirmed.
  const own = pending?.cell ?? confirmed();
  if (own && client.actor !== null) cells.set(client.actor, own);
  const seen = new Set();
  for (const [actor, pos] of cells) {
    seen.add(String(actor));
    let el = /** @type {HTMLElement|null} */ (
      arena.querySelector(`.marker[data-actor="${actor}"]`)
    );
    if (!el) {
      el = document.createElement('div');
      el.className = 'marker';
      el.dataset.testid = 'marker';
      el.dataset.actor = String(actor);
      el.innerHTML = '<span class="tag"></span><span class="dot"></span>';
      el.addEventListener('animationend', (e) => {
        /** @type {HTMLElement} */ (e.currentTarget).removeAttribute('data-refused');
      });
      arena.append(el);
    }
    const name = nameOf(actor);
    el.dataset.x = String(pos[0]);
    el.dataset.y = String(pos[1]);
    el.dataset.name = name;
    el.toggleAttribute('data-self', actor === client.actor);
    el.toggleAttribute('data-pending', actor === client.actor && pending !== null);
    el.style.setProperty('--x', String(pos[0]));
    el.style.setProperty('--y', String(pos[1]));
    el.style.setProperty('--color', color(actor));
    /** @type {HTMLElement} */ (el.querySelector('.tag')).textContent = name;
    /** @type {HTMLElement} */ (el.querySelector('.dot')).textContent = name
      .charAt(0)
      .toUpperCase();
  }
  for (const el of arena.querySelectorAll('.marker')) {
    if (!seen.has(/** @type {HTMLElement} */ (el).dataset.actor ?? '')) el.remove();
  }
  renderCell();
}

/** The side panel's cell: the one the relay confirmed, and where we are walking to. */
function renderCell() {
  const el = $('cell');
  const here = confirmed();
  if (here) {
    el.dataset.x = String(here[0]);
    el.dataset.y = String(here[1]);
  } else {
    delete el.dataset.x;
    delete el.dataset.y;
  }
  el.textContent = `${here ? fmt(here) : '–'}${target ? ` → ${fmt(target)}` : ''}`;
}

/** Shake our marker: the relay refused its move and it went back. */
function flash() {
  const el = arena.querySelector(`.marker[data-actor="${client.actor}"]`);
  if (!el) return;
  el.removeAttribute('data-refused');
  void (/** @type {HTMLElement} */ (el).offsetWidth); // restart the animation
  el.setAttribute('data-refused', '');
}

function renderMembers() {
  const list = $('members');
  list.replaceChildren(
    ...[...client.members.values()].map((m) => {
      const li = document.createElement('li');
      li.dataset.actor = String(m.actor);
      li.style.setProperty('--color', color(m.actor));
      const you = m.actor === client.actor ? ' (you)' : '';
      li.innerHTML =
        '<span class="swatch"></span><span class="name"></span><span class="actor"></span>';
      /** @type {HTMLElement} */ (li.querySelector('.name')).textContent =
        `${m.meta?.name || 'anonymous'}${you}`;
      /** @type {HTMLElement} */ (li.querySelector('.actor')).textContent = `actor ${m.actor}`;
      return li;
    }),
  );
  $('count').textContent = String(client.members.size);
  const me = $('me');
  // The relay's name for us: with a token, the token's name wins over ours.
  const myName = client.members.get(client.actor)?.meta?.name || name;
  me.textContent = `${myName} (actor ${client.actor})`;
  document.title = `${myName} · ${room} · relay`;
  me.dataset.actor = String(client.actor);
}

function ring(/** @type {number} */ actor, /** @type {number} */ x, /** @type {number} */ y) {
  if (!Number.isInteger(x) || !Number.isInteger(y)) return;
  const el = document.createElement('div');
  el.className = 'ring';
  el.dataset.testid = 'ring';
  el.dataset.actor = String(actor);
  el.style.setProperty('--x', String(x));
  el.style.setProperty('--y', String(y));
  el.style.setProperty('--color', color(actor));
  el.addEventListener('animationend', () => el.remove());
  arena.append(el);
}

function setStatus(/** @type {string} */ state, /** @type {string} */ text) {
  statusEl.dataset.status = state;
  document.body.dataset.status = state; // the CSS dims a board that may be out of date
  statusEl.textContent = text;
}

function log(/** @type {string} */ line) {
  const list = $('log');
  const top = /** @type {HTMLElement|null} */ (list.firstElementChild);
  if (top?.dataset.line === line) {
    // A run of the same line (failed reconnects) takes one row: "line ×3".
    const times = Number(top.dataset.times) + 1;
    top.dataset.times = String(times);
    top.textContent = `${line} ×${times}`;
    return;
  }
  const li = document.createElement('li');
  li.dataset.line = line;
  li.dataset.times = '1';
  li.textContent = line;
  list.prepend(li);
  while (list.children.length > 8) list.lastElementChild?.remove();
}

function randomName() {
  const first = ['Swift', 'Quiet', 'Brave', 'Lucky', 'Clever', 'Sunny', 'Misty', 'Rapid'];
  const second = ['Otter', 'Falcon', 'Badger', 'Lynx', 'Heron', 'Fox', 'Panda', 'Wren'];
  const pick = (/** @type {string[]} */ a) => a[Math.floor(Math.random() * a.length)];
  return `${pick(first)} ${pick(second)}`;
}

// For a console session: the client and what the page shows.
window.relayDemo = {
  client,
  get actor() {
    return client.actor;
  },
  get members() {
    return [...client.members.values()];
  },
  get positions() {
    return Object.fromEntries(
      [...client.snapshot].filter(([, v]) => v.pos).map(([a, v]) => [a, v.pos]),
    );
  },
  /** Our cell as the relay has it, the move in flight, and where we are walking to. */
  get moving() {
    return { confirmed: confirmed(), pending: pending?.cell ?? null, target };
  },
  goTo: (/** @type {number} */ x, /** @type {number} */ y) => goTo([x, y]),
};
