// End-to-end test of the demo page in headless Chromium, driven by playwright-core.
//
//   node tests/browser/demo_e2e.mjs http://127.0.0.1:PORT
//
// Run by tests/browser/test_demo.py, which owns the relay server: to restart it,
// this script prints "@@restart-server term" (graceful: close 1001) or
// "@@restart-server kill" (a crash: 1006) and waits for "ok" on stdin.
// With SCREENSHOT=path set it saves a picture of the demo with three players.
// Exits 0 when every scenario passed, 1 with the failing step otherwise.
//
// The room is a grid room, so the relay enforces the grid rules
// (relay/rules/grid.py): one step at a time, never onto another player.

import { createInterface } from 'node:readline';
import { createRequire } from 'node:module';

// playwright-core lives in clients/js/node_modules; resolve it from there.
const require = createRequire(new URL('../../clients/js/package.json', import.meta.url));
const { chromium } = require('playwright-core');

const BASE = process.argv[2];
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SCREENSHOT = process.env.SCREENSHOT;
const TIMEOUT_MS = Number(process.env.E2E_TIMEOUT_MS || 15000); // one bound for every wait
const COLS = 20;
const ROWS = 15;
const ROOM = process.env.E2E_ROOM || `grid:e2e-${Date.now().toString(36)}`; // fresh room per run

const CHROMIUM_ARGS = [
  '--headless',
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];

if (!BASE) {
  console.error('usage: node demo_e2e.mjs http://HOST:PORT');
  process.exit(2);
}

const stdin = createInterface({ input: process.stdin });
const stdinLines = stdin[Symbol.asyncIterator]();

/** Ask the test that owns the relay to stop it ('term' or 'kill') and start it again, same port. */
async function restartServer(how) {
  console.log(`@@restart-server ${how}`);
  const { value, done } = await stdinLines.next();
  if (done || value.trim() !== 'ok')
    throw new Error(`the server restart failed: ${done ? 'no answer' : value}`);
}

let step = 'starting';
const say = (/** @type {string} */ text) => {
  step = text;
  console.log(`- ${text}`);
};

/**
 * Poll check() until it returns a truthy value; fail after TIMEOUT_MS saying what
 * was awaited and what was last seen. Returns check()'s value.
 * @template T @param {string} what @param {() => Promise<T>} check @returns {Promise<T>}
 */
async function waitFor(what, check) {
  const deadline = Date.now() + TIMEOUT_MS;
  let last;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
      last = value;
    } catch (err) {
      last = String(err);
    }
    if (Date.now() > deadline) {
      throw new Error(
        `timed out after ${TIMEOUT_MS} ms waiting for ${what}; last seen: ${JSON.stringify(last)}`,
      );
    }
    await new Promise((r) => setTimeout(r, 50)); // the poll interval of a bounded wait
  }
}

/**
 * Every marker as a user sees it: the cell under the marker's centre on screen,
 * which must agree with its data-x / data-y (a marker still sliding does not count).
 * @returns {Promise<Record<string, {x: number, y: number, name: string, self: boolean}>|null>}
 */
async function markers(/** @type {import('playwright-core').Page} */ page) {
  return page.evaluate(
    ([cols, rows]) => {
      const arena = document.querySelector('[data-testid="arena"]');
      const box = arena.getBoundingClientRect();
      const cellW = arena.clientWidth / cols;
      const cellH = arena.clientHeight / rows;
      const out = {};
      for (const el of arena.querySelectorAll('[data-testid="marker"]')) {
        const r = el.getBoundingClientRect();
        const x = Math.floor((r.left + r.width / 2 - box.left - arena.clientLeft) / cellW);
        const y = Math.floor((r.top + r.height / 2 - box.top - arena.clientTop) / cellH);
        if (r.width === 0 || x !== Number(el.dataset.x) || y !== Number(el.dataset.y)) return null;
        out[el.dataset.actor] = {
          x,
          y,
          name: el.dataset.name,
          self: el.hasAttribute('data-self'),
          pending: el.hasAttribute('data-pending'),
        };
      }
      return out;
    },
    [COLS, ROWS],
  );
}

/** The cell the page's side panel says the relay confirmed, or null. */
async function confirmedCell(/** @type {import('playwright-core').Page} */ page) {
  const el = page.locator('[data-testid="cell"]');
  const [x, y] = [await el.getAttribute('data-x'), await el.getAttribute('data-y')];
  return x === null || y === null ? null : { x: Number(x), y: Number(y) };
}

/**
 * The page's own actor and cell, once it is connected and placed: its marker
 * stands still on the cell the relay confirmed (no move in flight), which the
 * side panel shows too.
 */
async function self(/** @type {import('playwright-core').Page} */ page, /** @type {string} */ who) {
  return waitFor(`${who} to be connected and placed`, async () => {
    if ((await page.getAttribute('[data-testid="status"]', 'data-status')) !== 'open') return null;
    const seen = await markers(page);
    const [actor, m] = Object.entries(seen ?? {}).find(([, v]) => v.self) ?? [];
    if (!actor || m.pending) return null;
    const cell = await confirmedCell(page);
    return cell && cell.x === m.x && cell.y === m.y ? { actor, x: m.x, y: m.y } : null;
  });
}

/** Wait until the page shows itself settled on (x, y), confirmed by the relay. */
async function settlesAt(page, who, x, y) {
  await waitFor(`${who} to stand on ${x},${y}, confirmed`, async () => {
    const me = await self(page, who);
    return me.x === x && me.y === y;
  });
}

/** The page's log, newest line first. */
const logOf = (/** @type {import('playwright-core').Page} */ page) =>
  page.locator('[data-testid="log"]').textContent();

/**
 * Record on `page` every pos that actor sends, as the page receives them; the
 * returned function reads the record.
 */
async function trail(/** @type {import('playwright-core').Page} */ page, actor) {
  const key = `trail${actor}`;
  await page.evaluate(
    ([key, actor]) => {
      const seen = (window[key] = []);
      window.relayDemo.client.on('state', ({ from, key: k, data }) => {
        if (from === actor && k === 'pos') seen.push(data);
      });
    },
    [key, Number(actor)],
  );
  return () => page.evaluate((key) => window[key], key);
}

/** Wait until page shows actor's marker at (x, y). */
async function seesAt(page, who, actor, x, y, whose) {
  await waitFor(`${who} to see ${whose} (actor ${actor}) at ${x},${y}`, async () => {
    const m = (await markers(page))?.[actor];
    return m && m.x === x && m.y === y;
  });
}

/** A neighbouring cell that is on the board and not taken, and the key that goes there. */
function stepFrom(pos, taken) {
  const options = [
    ['ArrowRight', 1, 0],
    ['ArrowLeft', -1, 0],
    ['ArrowDown', 0, 1],
    ['ArrowUp', 0, -1],
  ];
  for (const [key, dx, dy] of options) {
    const x = pos.x + dx;
    const y = pos.y + dy;
    if (x >= 0 && y >= 0 && x < COLS && y < ROWS && !taken.some((t) => t.x === x && t.y === y))
      return { key, x, y };
  }
  throw new Error(`no free cell next to ${pos.x},${pos.y}`);
}

/** A free cell away from everyone, to click on. */
function farCell(taken) {
  for (let y = ROWS - 1; y >= 0; y--) {
    for (let x = COLS - 1; x >= 0; x--) {
      if (taken.every((t) => Math.abs(t.x - x) + Math.abs(t.y - y) > 2)) return { x, y };
    }
  }
  throw new Error('no free cell to click');
}

async function clickCell(page, x, y) {
  const box = await page.locator('[data-testid="arena"]').boundingBox();
  await page.mouse.click(
    box.x + ((x + 0.5) * box.width) / COLS,
    box.y + ((y + 0.5) * box.height) / ROWS,
  );
}

const browser = await chromium.launch({
  executablePath: CHROMIUM,
  headless: true,
  args: CHROMIUM_ARGS,
});
const problems = [];

/**
 * Open the demo as player `name`. With `link`, its WebSocket goes through a
 * route that holds what the relay sends while link.held is set (a lagging
 * connection), and passes it on in order when release(link) is called.
 */
async function open(name, link = null) {
  const context = await browser.newContext({
    viewport: { width: 984, height: 600 },
  });
  if (link) {
    await context.routeWebSocket(/\/ws\//, (ws) => {
      const server = ws.connectToServer(); // the page's messages go to the relay as they are
      server.onMessage((message) => (link.held ? link.queue.push(message) : ws.send(message)));
      link.toPage = ws;
    });
  }
  const page = await context.newPage();
  page.setDefaultTimeout(TIMEOUT_MS);
  page.on('pageerror', (err) => problems.push(`${name}: uncaught ${err.message}`));
  page.on('console', (msg) => {
    // Chromium logs each refused reconnect while the relay is down; those are expected.
    if (msg.type() === 'error' && !/WebSocket connection to .* failed/.test(msg.text())) {
      problems.push(`${name}: console error ${msg.text()}`);
    }
  });
  await page.goto(`${BASE}/?room=${encodeURIComponent(ROOM)}&name=${name}`);
  return page;
}

/** Pass on what a lagging link held, in order, and stop holding. */
function release(link) {
  for (const message of link.queue.splice(0)) link.toPage.send(message);
  link.held = false;
}

try {
  say(`two players join ${ROOM}`);
  const alice = await open('Alice');
  const bob = await open('Bob');
  let a = await self(alice, 'Alice');
  let b = await self(bob, 'Bob');
  if (a.x === b.x && a.y === b.y)
    throw new Error(`Alice and Bob were both placed on ${a.x},${a.y}`);
  await seesAt(alice, 'Alice', b.actor, b.x, b.y, 'Bob');
  await seesAt(bob, 'Bob', a.actor, a.x, a.y, 'Alice');

  say('Alice moves with the keyboard; Bob sees it');
  let next = stepFrom(a, [b]);
  await alice.keyboard.press(next.key);
  await seesAt(alice, 'Alice', a.actor, next.x, next.y, 'herself');
  await seesAt(bob, 'Bob', a.actor, next.x, next.y, 'Alice');
  a = { ...a, x: next.x, y: next.y };

  say('Bob clicks a far cell and walks there a step at a time; Alice sees him arrive');
  const target = farCell([a, b]);
  const bobsTrail = await trail(alice, b.actor);
  await clickCell(bob, target.x, target.y);
  await seesAt(alice, 'Alice', b.actor, target.x, target.y, 'Bob');
  await settlesAt(bob, 'Bob', target.x, target.y);
  const steps = await bobsTrail();
  const distance = Math.abs(target.x - b.x) + Math.abs(target.y - b.y);
  let from = [b.x, b.y];
  for (const cell of steps) {
    if (Math.abs(cell[0] - from[0]) + Math.abs(cell[1] - from[1]) !== 1)
      throw new Error(`Bob jumped from ${from} to ${cell}: ${JSON.stringify(steps)}`);
    from = cell;
  }
  if (steps.length < distance)
    throw new Error(
      `Bob's walk of ${distance} steps took ${steps.length}: ${JSON.stringify(steps)}`,
    );
  b = { ...b, ...target };

  say("Alice sets off a boom; Bob and Alice herself see Alice's ring");
  await alice.keyboard.press(' ');
  for (const [who, page] of [
    ['Bob', bob],
    ['Alice', alice],
  ]) {
    await waitFor(
      `${who} to see Alice's ring`,
      async () => (await page.locator(`[data-testid="ring"][data-actor="${a.actor}"]`).count()) > 0,
    );
  }

  say('Carol joins late and sees everyone where they are');
  const carol = await open('Carol');
  const c = await self(carol, 'Carol');
  for (const other of [a, b]) {
    if (other.x === c.x && other.y === c.y)
      throw new Error(`Carol was placed on an occupied cell ${c.x},${c.y}`);
  }
  await seesAt(carol, 'Carol', a.actor, a.x, a.y, 'Alice');
  await seesAt(carol, 'Carol', b.actor, b.x, b.y, 'Bob');
  await seesAt(alice, 'Alice', c.actor, c.x, c.y, 'Carol');
  const names = await carol.locator('[data-testid="members"] li').allTextContents();
  if (
    names.length !== 3 ||
    !['Alice', 'Bob', 'Carol'].every((n) => names.some((t) => t.includes(n)))
  ) {
    throw new Error(`Carol's member list is ${JSON.stringify(names)}`);
  }

  say('every page measures its ping');
  for (const [who, page] of [
    ['Alice', alice],
    ['Bob', bob],
    ['Carol', carol],
  ]) {
    await waitFor(`${who}'s ping`, async () =>
      /\d+(\.\d+)? ms/.test(await page.textContent('[data-testid="rtt"]')),
    );
  }

  if (SCREENSHOT) {
    say(`screenshot of Carol's page to ${SCREENSHOT}`);
    await carol.keyboard.press(' ');
    await bob.keyboard.press(' ');
    await waitFor(
      "Carol to see Bob's ring",
      async () =>
        (await carol.locator(`[data-testid="ring"][data-actor="${b.actor}"]`).count()) > 0,
    );
    // Hold the rings half-way through their animation, or the picture may catch none.
    await carol.evaluate(() => {
      for (const a of document.getAnimations()) {
        a.pause();
        a.currentTime = 300;
      }
    });
    await carol.screenshot({ path: SCREENSHOT });
  }

  say('Dave lags: he steps onto a cell Alice took meanwhile, the relay refuses, and he goes back');
  const link = { held: false, queue: [], toPage: null };
  const dave = await open('Dave', link);
  const d = await self(dave, 'Dave');
  await seesAt(dave, 'Dave', a.actor, a.x, a.y, 'Alice');
  await seesAt(alice, 'Alice', d.actor, d.x, d.y, 'Dave');
  const contested = stepFrom(d, [a, b, c]); // next to Dave, free
  link.held = true; // from here Dave's page hears nothing from the relay
  await clickCell(alice, contested.x, contested.y);
  await settlesAt(alice, 'Alice', contested.x, contested.y);
  await seesAt(bob, 'Bob', a.actor, contested.x, contested.y, 'Alice');
  await seesAt(dave, 'Dave (lagging)', a.actor, a.x, a.y, 'Alice still where she was');
  await dave.keyboard.press(contested.key); // his page thinks the cell is free
  await waitFor("Dave's move in flight", async () => {
    const m = (await markers(dave))?.[d.actor];
    return m?.pending && m.x === contested.x && m.y === contested.y;
  });
  release(link);
  await settlesAt(dave, 'Dave', d.x, d.y);
  await seesAt(dave, 'Dave', a.actor, contested.x, contested.y, 'Alice');
  await seesAt(alice, 'Alice', d.actor, d.x, d.y, 'Dave, who never left his cell');
  await waitFor("Dave's log to show the refusal", async () =>
    /refused \(rejected\): cell \[\d+, \d+\] is taken/.test(await logOf(dave)),
  );
  a = { ...a, x: contested.x, y: contested.y };
  await dave.context().close();
  await waitFor(
    'Alice to see Dave leave',
    async () => (await alice.locator('[data-testid="members"] li').count()) === 3,
  );

  const pages = [
    ['Alice', alice],
    ['Bob', bob],
    ['Carol', carol],
  ];
  for (const [round, how, code] of [
    [1, 'term', 1001],
    [2, 'kill', 1006],
  ]) {
    say(`the relay is stopped (${how}) and started again; every page reconnects`);
    await restartServer(how);
    for (const [who, page] of pages) {
      await waitFor(`${who} to reconnect after close ${code}`, async () => {
        const el = page.locator('[data-testid="status"]');
        return (
          (await el.getAttribute('data-status')) === 'open' &&
          Number(await el.getAttribute('data-resyncs')) >= round
        );
      });
      const log = await page.locator('[data-testid="log"]').textContent();
      if (!log.includes(`connection closed: ${code}`))
        throw new Error(`${who}'s log does not show close ${code}: ${log}`);
    }
    a = await self(alice, 'Alice');
    b = await self(bob, 'Bob');
    const c2 = await self(carol, 'Carol');
    await seesAt(bob, 'Bob', a.actor, a.x, a.y, 'Alice after the restart');
    await seesAt(alice, 'Alice', b.actor, b.x, b.y, 'Bob after the restart');
    await seesAt(alice, 'Alice', c2.actor, c2.x, c2.y, 'Carol after the restart');

    say('after the restart, moves are seen again');
    next = stepFrom(a, [b, c2]);
    await alice.keyboard.press(next.key);
    await seesAt(bob, 'Bob', a.actor, next.x, next.y, 'Alice');
    await seesAt(carol, 'Carol', a.actor, next.x, next.y, 'Alice');
  }

  if (problems.length) throw new Error(`the pages reported errors:\n  ${problems.join('\n  ')}`);
  console.log('e2e: all scenarios passed');
} catch (err) {
  console.error(`e2e FAILED at step "${step}": ${err.message}`);
  if (problems.length) console.error(`page errors:\n  ${problems.join('\n  ')}`);
  process.exitCode = 1;
} finally {
  await browser.close();
  stdin.close();
}
