// The grid arena: each player is a marker on a 20 x 15 board. A player's cell
// is its STATE "pos" = [x, y]; a boom is the EVENT {t: "boom", x, y}. Every
// marker on screen is drawn from the client's snapshot, so what you see is
// what the room holds. Markers carry data-actor / data-x / data-y for tests.

import { RelayClient } from '/client.js';

const COLS = 20;
const ROWS = 15;
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

const params = new URLSearchParams(location.search);
const room = params.get('room') || 'grid:lobby';
const name = params.get('name') || randomName();

const $ = (/** @type {string} */ id) => /** @type {HTMLElement} */ (document.getElementById(id));
const arena = $('arena');
const statusEl = $('status');
$('room').textContent = room;
document.title = `${name} · ${room} · relay`;

let client;
try {
  client = new RelayClient({ room, name });
} catch (err) {
  setStatus('closed', String(err.message ?? err));
  throw err;
}
let resyncs = 0;

/** This player's cell, as last sent; null until placed. @type {[number, number]|null} */
let mine = null;

client.on('welcome', () => {
  setStatus('open', 'connected');
  // A fresh join holds no position of ours: keep the old cell if it is free,
  // otherwise take a free one, so two players never start on one cell.
  const held = client.snapshot.get(client.actor)?.pos;
  const wanted = held ?? mine;
  place(wanted && !occupied(wanted[0], wanted[1]) ? wanted : freeCell());
  renderMembers();
  measure();
  log(`joined ${room} as actor ${client.actor}`);
});
client.on('resynced', ({ actor, previousActor }) => {
  resyncs += 1;
  statusEl.dataset.resyncs = String(resyncs);
  log(`rejoined: actor ${previousActor} → ${actor}, fresh snapshot`);
});
client.on('state', ({ from, key, data }) => {
  if (key !== 'pos') return;
  // Two players who joined at the same instant can pick the same cell: the newer one moves.
  if (mine && isCell(data) && from < client.actor && data[0] === mine[0] && data[1] === mine[1]) {
    place(freeCell());
  }
  render();
});
client.on('event', ({ from, data }) => {
  if (data?.t === 'boom') ring(from, data.x, data.y);
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
client.on('error', ({ code, message }) => log(`error ${code}: ${message}`));
let lastClose = 0;
client.on('close', ({ code, reason, willReconnect }) => {
  lastClose = code;
  log(`connection closed: ${code}${reason ? ` ${reason}` : ''}`);
  if (!willReconnect) setStatus('closed', `closed: ${code}${reason ? ` ${reason}` : ''}`);
});
client.on('reconnecting', ({ attempt }) => {
  setStatus('reconnecting', `reconnecting… (closed ${lastClose}, try ${attempt})`);
});
client.ready.catch(() => {}); // the 'close' callback has shown why

// --- moves ------------------------------------------------------------------------

/** A position another player sent is drawn only if it is a cell of this board. */
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

/** Everyone's cells but ours, as the room holds them. */
function others() {
  const cells = new Map();
  for (const [actor, values] of client.snapshot) {
    if (actor !== client.actor && isCell(values.pos)) {
      cells.set(`${values.pos[0]},${values.pos[1]}`, actor);
    }
  }
  return cells;
}

const occupied = (/** @type {number} */ x, /** @type {number} */ y) => others().has(`${x},${y}`);

/** A random free cell (the board has room for far more than a room's members). */
function freeCell() {
  const taken = others();
  const free = [];
  for (let y = 0; y < ROWS; y++) {
    for (let x = 0; x < COLS; x++) if (!taken.has(`${x},${y}`)) free.push([x, y]);
  }
  return free[Math.floor(Math.random() * free.length)];
}

function place(/** @type {[number, number]} */ cell) {
  mine = cell;
  client.sendState('pos', cell);
  render();
}

function moveTo(/** @type {number} */ x, /** @type {number} */ y) {
  if (client.status !== 'open' || !mine) return;
  if (x < 0 || y < 0 || x >= COLS || y >= ROWS || occupied(x, y)) return;
  place([x, y]);
}

function boom() {
  if (client.status !== 'open' || !mine) return;
  const [x, y] = mine;
  client.sendEvent({ t: 'boom', x, y });
  ring(client.actor, x, y); // without echo our own events do not come back
}

window.addEventListener('keydown', (e) => {
  if (e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === ' ') {
    e.preventDefault();
    if (!e.repeat) boom();
    return;
  }
  const step = MOVES[e.key.length === 1 ? e.key.toLowerCase() : e.key];
  if (!step || !mine) return;
  e.preventDefault();
  moveTo(mine[0] + step[0], mine[1] + step[1]);
});

arena.addEventListener('click', (e) => {
  const box = arena.getBoundingClientRect();
  const cell = box.width / COLS;
  moveTo(
    Math.floor((e.clientX - box.left - arena.clientLeft) / cell),
    Math.floor((e.clientY - box.top - arena.clientTop) / cell),
  );
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
  const seen = new Set();
  for (const [actor, values] of client.snapshot) {
    const pos = values.pos;
    if (!isCell(pos)) continue;
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
      arena.append(el);
    }
    const name = nameOf(actor);
    el.dataset.x = String(pos[0]);
    el.dataset.y = String(pos[1]);
    el.dataset.name = name;
    el.toggleAttribute('data-self', actor === client.actor);
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
  me.textContent = `${name} (actor ${client.actor})`;
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
};
