import assert from 'node:assert/strict';
import { afterEach, test } from 'node:test';
import { decodeMulti, encode } from '@msgpack/msgpack';

import { RelayClient, RelayError, connect, socketUrl } from '../src/client.js';
import { FakeSocket, concat, until, welcome } from '../test-support/fake-socket.js';

const BASE = {
  url: 'http://relay.test:8000',
  room: 'grid:test',
  WebSocket: FakeSocket,
  backoffMs: 1,
  maxBackoffMs: 4,
};

/** Clients a test made, closed after it so that no reconnect timer outlives it. */
const live = new Set();

/** A client that has had its WELCOME. */
async function joined(options = {}, w = welcome()) {
  const pending = connect({ ...BASE, ...options });
  FakeSocket.last().push(w);
  const client = await pending;
  live.add(client);
  return client;
}

/** Every message the client sent on a socket, per frame. */
const sentFrames = (socket) => socket.sent.map((f) => [...decodeMulti(f)]);
const tick = () => new Promise((r) => setTimeout(r, 0));

afterEach(() => {
  for (const client of live) client.close();
  live.clear();
  FakeSocket.made.length = 0;
});

test('the socket URL carries the room and the query parameters', () => {
  const url = socketUrl({
    url: 'https://example.org/game/',
    room: 'grid:lobby',
    player: 'p 1',
    name: 'Ada',
    echo: true,
  });
  assert.equal(url, 'wss://example.org/game/ws/grid:lobby?player=p+1&name=Ada&echo=1');
  assert.throws(() => socketUrl({ url: 'http://x', room: 'no/slash' }), TypeError);
  // Outside a page (Node) there is no origin to default to: say so.
  assert.throws(() => socketUrl({ room: 'grid:lobby' }), /url is required/);
});

test('without a WebSocket class the client says what to do', () => {
  const saved = globalThis.WebSocket;
  // @ts-ignore: as on Node 20 without --experimental-websocket
  delete globalThis.WebSocket;
  try {
    assert.throws(() => new RelayClient({ ...BASE, WebSocket: undefined }), /no WebSocket here/);
  } finally {
    if (saved) globalThis.WebSocket = saved;
  }
});

test('connect resolves on WELCOME with the members and the snapshot', async () => {
  const client = await joined();
  assert.equal(FakeSocket.last().binaryType, 'arraybuffer');
  assert.equal(client.status, 'open');
  assert.equal(client.actor, 2);
  assert.equal(client.room, 'grid:test');
  assert.deepEqual([...client.members.keys()], [1, 2]);
  assert.deepEqual(client.members.get(1), { actor: 1, player: 'p-one', meta: { name: 'One' } });
  assert.deepEqual(client.snapshot.get(1).pos, [3, 4]);
  assert.equal(client.offset, 10);
  assert.equal(client.limits.max_frame_bytes, 16384);
});

test('JOIN, STATE and LEAVE keep members and snapshot current, in one frame', async () => {
  const client = await joined();
  const seen = [];
  for (const type of ['join', 'state', 'event', 'leave'])
    client.on(type, (e) => seen.push([type, e]));
  FakeSocket.last().push(
    [5, 3, 'p-three', { name: 'Three' }, 11],
    [2, 3, 'pos', [5, 6], 12],
    [2, 1, 'pos', [4, 4], 13],
    [1, 3, 9, { t: 'boom', x: 5, y: 6 }, 14],
    [2, 1, 'pos', null, 15],
    [6, 3, 1000, 16],
  );
  assert.deepEqual([...client.members.keys()], [1, 2]);
  assert.equal(client.snapshot.has(3), false, 'a member that left has no STATE left');
  assert.equal(client.snapshot.has(1), false, 'STATE nil deleted the only key');
  assert.equal(client.offset, 16);
  assert.deepEqual(
    seen.map(([type]) => type),
    ['join', 'state', 'state', 'event', 'state', 'leave'],
  );
  assert.deepEqual(seen[0][1], {
    actor: 3,
    player: 'p-three',
    meta: { name: 'Three' },
    offset: 11,
  });
  assert.deepEqual(seen[2][1], { from: 1, key: 'pos', data: [4, 4], previous: [3, 4], offset: 13 });
  assert.deepEqual(seen[3][1], { from: 3, seq: 9, data: { t: 'boom', x: 5, y: 6 }, offset: 14 });
  assert.deepEqual(seen[5][1], {
    actor: 3,
    player: 'p-three',
    meta: { name: 'Three' },
    code: 1000,
    offset: 16,
  });
});

test('integer STATE keys and actors work after a WELCOME decoded them from map keys', async () => {
  const client = await joined({}, welcome({ snapshot: { 1: { 7: 'seven' } } }));
  assert.equal(client.snapshot.get(1)[7], 'seven');
  FakeSocket.last().push([2, 1, 7, 'eight', 11]);
  assert.equal(client.snapshot.get(1)[7], 'eight');
});

test('sends made in one task leave as one frame, with increasing seqs', async () => {
  const client = await joined();
  const socket = FakeSocket.last();
  const seqs = [
    client.sendEvent({ t: 'boom' }),
    client.sendState('pos', [1, 2]),
    client.sendDirect(1, 'hi'),
  ];
  assert.deepEqual(seqs, [1, 2, 3]);
  assert.equal(socket.sent.length, 0, 'nothing goes out before the task ends');
  await tick();
  assert.deepEqual(sentFrames(socket), [
    [
      [1, 1, { t: 'boom' }],
      [2, 2, 'pos', [1, 2]],
      [3, 3, 1, 'hi'],
    ],
  ]);
  assert.deepEqual(
    client.snapshot.get(2).pos,
    [1, 2],
    'without echo our own STATE is applied locally',
  );
  client.sendEvent(1);
  await tick();
  assert.equal(socket.sent.length, 2);
});

test("a batch over the server's max_frame_bytes goes out as several frames", async () => {
  const client = await joined(
    {},
    welcome({ limits: { max_frame_bytes: 64, max_msgs_per_s: 120 } }),
  );
  for (let i = 0; i < 8; i++) client.sendEvent('x'.repeat(20));
  await tick();
  const socket = FakeSocket.last();
  assert.ok(socket.sent.length > 1);
  assert.ok(socket.sent.every((f) => f.length <= 64));
  assert.equal(sentFrames(socket).flat().length, 8);
});

test('ping resolves with the round-trip time when PONG comes back', async () => {
  const client = await joined();
  const socket = FakeSocket.last();
  const rtt = client.ping();
  await tick();
  const [[[type, clientTime]]] = sentFrames(socket);
  assert.equal(type, 9);
  socket.push([9, clientTime, 1700000000123]);
  assert.ok((await rtt) >= 0);
});

test('ERROR and DROPPED reach their callbacks', async () => {
  const client = await joined();
  const errors = [];
  const dropped = [];
  client.on('error', (e) => errors.push(e));
  client.on('dropped', (e) => dropped.push(e));
  FakeSocket.last().push([7, 4, 'too_large', 'data is too big'], [8, 5], [8, 2]);
  FakeSocket.last().pushBytes(Uint8Array.of(0x93, 0x01)); // truncated
  assert.deepEqual(errors[0], { seq: 4, code: 'too_large', message: 'data is too big' });
  assert.equal(errors[1].code, 'undecodable');
  assert.deepEqual(dropped, [
    { count: 5, total: 5 },
    { count: 2, total: 7 },
  ]);
  assert.equal(client.droppedTotal, 7);
});

test('a refused connection rejects connect with the close code and reason', async () => {
  const pending = connect({ ...BASE });
  FakeSocket.last().drop(4400, 'bad room id');
  await assert.rejects(
    pending,
    (err) => err instanceof RelayError && err.code === 4400 && err.reason === 'bad room id',
  );
  assert.equal(FakeSocket.made.length, 1, 'no retry before a first WELCOME');
});

test('with several nodes, the first connect tries each once before it gives up', async () => {
  const pending = connect({ ...BASE, urls: ['http://a.test:8000', 'http://b.test:8000'] });
  FakeSocket.last().drop(1006); // a is down
  assert.equal(new URL(FakeSocket.last().url).host, 'b.test:8000');
  FakeSocket.last().drop(1013, 'full'); // b refuses too: connect reports b's answer
  await assert.rejects(pending, (err) => err instanceof RelayError && err.code === 1013);
  assert.equal(FakeSocket.made.length, 2, 'each node once');

  const second = connect({ ...BASE, urls: ['http://a.test:8000', 'http://b.test:8000'] });
  FakeSocket.last().drop(1006);
  FakeSocket.last().push(welcome());
  const client = await second;
  live.add(client);
  assert.equal(client.status, 'open');
  assert.equal(new URL(client.url).host, 'b.test:8000', 'it stays on the node that answered');

  const refused = connect({ ...BASE, urls: ['http://a.test:8000', 'http://b.test:8000'] });
  const before = FakeSocket.made.length;
  FakeSocket.last().drop(4001, 'bad token'); // a verdict: every node would say the same
  await assert.rejects(refused, (err) => err instanceof RelayError && err.code === 4001);
  assert.equal(FakeSocket.made.length, before, 'no other node tried');
});

test('an error with no close event after it ends the connection as 1006', async () => {
  // Node 20's WebSocket fires only error for a refused connection; a browser fires close too.
  const pending = connect({ ...BASE, urls: ['http://a.test:8000', 'http://b.test:8000'] });
  FakeSocket.last().fail(); // a is down
  await until(() => FakeSocket.made.length === 2, 2000, 'the next node');
  assert.equal(new URL(FakeSocket.last().url).host, 'b.test:8000');
  FakeSocket.last().fail();
  await assert.rejects(pending, (err) => err instanceof RelayError && err.code === 1006);

  const client = await joined();
  const closes = [];
  client.on('close', (e) => closes.push(e));
  FakeSocket.last().fail(); // a node killed under an open connection
  await until(() => FakeSocket.made.length === 4, 2000, 'a reconnect');
  assert.deepEqual(closes, [{ code: 1006, reason: '', willReconnect: true }]);
});

test('an error followed by close is one close, with its code', async () => {
  const client = await joined();
  const closes = [];
  client.on('close', (e) => closes.push(e));
  const socket = FakeSocket.last();
  socket.onerror({ type: 'error' });
  socket.drop(4008, 'slow');
  await until(() => FakeSocket.made.length === 2, 2000, 'a reconnect');
  await new Promise((r) => setTimeout(r, 300)); // past the error's grace: no second close
  assert.deepEqual(closes, [{ code: 4008, reason: 'slow', willReconnect: true }]);
  assert.equal(FakeSocket.made.length, 2);
});

test('a token function is asked for a fresh token on every connect', async () => {
  let issued = 0;
  const client = await joined({ token: () => `token-${++issued}` });
  assert.equal(query(FakeSocket.made[0]).token, 'token-1');
  const socket = await breakLink(client, 1006);
  assert.equal(query(socket).token, 'token-2');
  assert.equal(query(socket).resume, 'resume-x');
});

test('a broken connection is rejoined with backoff and a fresh snapshot', async () => {
  const client = await joined();
  client.sendEvent('before');
  await tick();
  const events = [];
  for (const type of ['close', 'reconnecting', 'resynced'])
    client.on(type, (e) => events.push([type, e]));
  const pings = client.ping();
  FakeSocket.last().drop(1006);
  await assert.rejects(pings, RelayError);
  assert.equal(client.status, 'reconnecting');
  assert.equal(client.sendEvent('meanwhile'), 2, 'queued for after the reconnect');
  // The first retry fails too: the server is still down.
  await until(() => FakeSocket.made.length === 2, 1000, 'a first retry');
  FakeSocket.last().drop(1006);
  await until(() => FakeSocket.made.length === 3, 1000, 'a second retry');
  FakeSocket.last().push(
    welcome({
      actor: 5,
      members: [
        [5, 'p-two', {}],
        [6, 'p-six', {}],
      ],
      snapshot: { 6: { pos: [9, 9] } },
      offset: 3,
    }),
  );
  assert.equal(client.status, 'open');
  assert.equal(client.actor, 5);
  assert.deepEqual([...client.members.keys()], [5, 6]);
  assert.deepEqual([...client.snapshot.keys()], [6]);
  assert.deepEqual(
    events.map(([type]) => type),
    ['close', 'reconnecting', 'close', 'reconnecting', 'resynced'],
  );
  assert.deepEqual(events[0][1], { code: 1006, reason: '', willReconnect: true });
  assert.equal(events[3][1].attempt, 2);
  assert.deepEqual(events[4][1], { actor: 5, previousActor: 2, unsentDirects: [] });
  await tick();
  assert.deepEqual(
    sentFrames(FakeSocket.last()),
    [[[1, 2, 'meanwhile']]],
    'a new seat gets the moves that never left, not those the old seat may have applied',
  );
  assert.equal(client.sendEvent('again'), 3, 'seq keeps increasing across connections');
});

for (const code of [4409, 4001, 1008]) {
  test(`close ${code} ends the client for good`, async () => {
    const client = await joined();
    const closes = [];
    client.on('close', (e) => closes.push(e));
    FakeSocket.last().drop(code, 'why');
    await tick();
    assert.equal(client.status, 'closed');
    assert.deepEqual(closes, [{ code, reason: 'why', willReconnect: false }]);
    assert.equal(FakeSocket.made.length, 1);
  });
}

test('close() flushes what was sent, closes, and does not reconnect', async () => {
  const client = await joined();
  const socket = FakeSocket.last();
  client.sendEvent('bye');
  client.close();
  assert.equal(socket.sent.length, 1);
  await until(() => client.status === 'closed', 1000, 'closed');
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(FakeSocket.made.length, 1);
});

test('a throwing callback does not stop the others', async () => {
  const client = await joined();
  const seen = [];
  const uncaught = [];
  const saved = globalThis.reportError;
  globalThis.reportError = (err) => uncaught.push(err);
  client.on('event', () => {
    throw new Error('game bug');
  });
  client.on('event', (e) => seen.push(e.data));
  FakeSocket.last().push([1, 1, 1, 'a', 11], [1, 1, 2, 'b', 12]);
  globalThis.reportError = saved;
  assert.deepEqual(seen, ['a', 'b']);
  assert.equal(uncaught.length, 2);
});

test('the client is usable without connect(): ready resolves on WELCOME', async () => {
  const client = new RelayClient({ ...BASE });
  assert.equal(client.status, 'connecting');
  assert.throws(() => client.sendState('pos', [0, 0]), RelayError);
  FakeSocket.last().pushBytes(concat([encode(welcome()), encode([5, 9, 'p9', {}, 11])]));
  assert.equal(await client.ready, client);
  assert.ok(client.members.has(9), 'a JOIN batched with the WELCOME is applied after it');
});

// --- resume ---------------------------------------------------------------------

/** The query parameters of a socket's URL. */
const query = (socket) => Object.fromEntries(new URL(socket.url).searchParams);

/** Break the link of a joined client with code, and wait for its next socket. */
async function breakLink(client, code = 1006) {
  const before = FakeSocket.made.length;
  FakeSocket.last().drop(code);
  assert.equal(client.status, 'reconnecting');
  await until(() => FakeSocket.made.length > before, 1000, 'a reconnect');
  return FakeSocket.last();
}

test('after a broken link the reconnect asks to resume the seat at the last offset', async () => {
  const client = await joined({ name: 'Two', token: 'signed.jwt', echo: true });
  FakeSocket.last().push([5, 3, 'p-three', {}, 11], [1, 3, 1, 'x', 12], [3, 3, 2, 'psst']);
  assert.equal(client.offset, 12, 'DIRECT has no offset: the last one seen is the EVENT');
  const socket = await breakLink(client, 4008);
  assert.deepEqual(query(socket), {
    token: 'signed.jwt',
    player: 'p-two', // this seat's player id, from members
    name: 'Two',
    echo: '1',
    resume: 'resume-x',
    offset: '12',
    epoch: 'epoch-1',
  });
  // A retry that fails before its WELCOME asks for the same again.
  socket.drop(1013);
  await until(() => FakeSocket.made.length === 3, 1000, 'a second retry');
  assert.equal(FakeSocket.last().url, socket.url);
});

for (const code of [1001, 1006, 1011, 1012, 1013, 4008]) {
  test(`close ${code} reconnects with resume parameters`, async () => {
    const client = await joined();
    const socket = await breakLink(client, code);
    assert.equal(query(socket).resume, 'resume-x');
    assert.equal(query(socket).offset, '10');
  });
}

test('with several nodes, a node going away (1001) or failing sends the resume to the next', async () => {
  const urls = ['http://a.test:8000', 'http://b.test:8000'];
  const client = await joined({ urls });
  assert.equal(new URL(FakeSocket.last().url).host, 'a.test:8000');
  const toB = await breakLink(client, 1001);
  assert.equal(new URL(toB.url).host, 'b.test:8000');
  assert.equal(query(toB).resume, 'resume-x');
  toB.drop(1006); // b cannot be reached either: back to a
  await until(() => new URL(FakeSocket.last().url).host === 'a.test:8000', 1000, 'a retry on a');
  assert.equal(query(FakeSocket.last()).resume, 'resume-x');
});

test('a broken link (1006) tries the same node first', async () => {
  const client = await joined({ urls: ['http://a.test:8000', 'http://b.test:8000'] });
  const socket = await breakLink(client, 1006);
  assert.equal(new URL(socket.url).host, 'a.test:8000');
});

test('a close that gives the seat up (4029) reconnects as a fresh join', async () => {
  const client = await joined({ player: 'me' });
  const socket = await breakLink(client, 4029);
  assert.deepEqual(query(socket), { player: 'me' });
});

test('an exact resume keeps members and snapshot, applies what follows, emits resumed', async () => {
  const client = await joined();
  const seen = [];
  for (const type of ['welcome', 'resumed', 'resynced', 'state', 'join'])
    client.on(type, (e) => seen.push([type, e]));
  FakeSocket.last().push([2, 1, 'pos', [5, 5], 11], [2, 1, 'hp', 3, 12]);
  seen.length = 0;
  const socket = await breakLink(client);
  // The server's WELCOME carries its current members and snapshot (after offset 12),
  // then replays the room messages after 12: applied over what the client kept.
  socket.push(
    welcome({
      actor: 2,
      offset: 12,
      members: [
        [1, 'p-one', { name: 'One' }],
        [2, 'p-two', { name: 'Two' }],
        [3, 'p-three', {}],
      ],
      snapshot: { 1: { pos: [6, 6], hp: 3 }, 3: { pos: [0, 0] } },
      resumeToken: 'resume-y',
    }),
    [2, 1, 'pos', [6, 6], 13],
    [5, 3, 'p-three', {}, 14],
    [2, 3, 'pos', [0, 0], 15],
  );
  assert.equal(client.status, 'open');
  assert.deepEqual(
    seen.map(([type]) => type),
    ['welcome', 'resumed', 'state', 'join', 'state'],
  );
  assert.deepEqual(seen[1][1], { actor: 2, offset: 12 });
  assert.deepEqual(seen[2][1].previous, [5, 5], 'the kept snapshot, not the WELCOME one');
  assert.deepEqual([...client.members.keys()], [1, 2, 3]);
  assert.deepEqual({ ...client.snapshot.get(1) }, { pos: [6, 6], hp: 3 });
  assert.deepEqual(client.snapshot.get(3).pos, [0, 0]);
  assert.equal(client.offset, 15);
  // The next break resumes with the new token and offset.
  const again = await breakLink(client);
  assert.equal(query(again).resume, 'resume-y');
  assert.equal(query(again).offset, '15');
});

for (const [why, w] of [
  ['a later offset (history too short)', { actor: 2, offset: 40 }],
  ['another epoch (the room started over)', { actor: 2, offset: 12, epoch: 'epoch-2' }],
  ['another actor (the seat was gone)', { actor: 7, offset: 12 }],
]) {
  test(`a WELCOME with ${why} is a fresh snapshot: resynced`, async () => {
    const client = await joined();
    const seen = [];
    for (const type of ['resumed', 'resynced']) client.on(type, (e) => seen.push([type, e]));
    FakeSocket.last().push([2, 1, 'pos', [5, 5], 11], [6, 1, 1000, 12]);
    assert.equal(client.members.has(1), false);
    const socket = await breakLink(client);
    assert.equal(query(socket).offset, '12');
    socket.push(
      welcome({
        ...w,
        members: [
          [1, 'p-one', {}],
          [w.actor, 'p-two', {}],
        ],
        snapshot: { 1: { pos: [1, 1] } },
      }),
    );
    assert.deepEqual(seen, [['resynced', { actor: w.actor, previousActor: 2, unsentDirects: [] }]]);
    assert.deepEqual([...client.members.keys()], [1, w.actor]);
    assert.deepEqual(client.snapshot.get(1).pos, [1, 1]);
    assert.equal(client.offset, w.offset);
  });
}

test('after a resume the moves after last_seq are re-sent in order, in one frame', async () => {
  const client = await joined();
  for (let i = 1; i <= 5; i++) client.sendEvent(`m${i}`);
  client.sendState('pos', [1, 1]);
  client.sendDirect(1, 'hi');
  await tick();
  const socket = await breakLink(client);
  assert.equal(socket.sent.length, 0, 'nothing is sent before the WELCOME');
  socket.push(welcome({ actor: 2, offset: 10, lastSeq: 4 }));
  await tick();
  assert.deepEqual(sentFrames(socket), [
    [
      [1, 5, 'm5'],
      [2, 6, 'pos', [1, 1]],
      [3, 7, 1, 'hi'],
    ],
  ]);
  // The server has them now: a later resume re-sends only what is newer.
  client.sendEvent('m8');
  await tick();
  const next = await breakLink(client);
  next.push(welcome({ actor: 2, offset: 10, lastSeq: 7 }));
  await tick();
  assert.deepEqual(sentFrames(next), [[[1, 8, 'm8']]]);
});

test('DIRECTs queued for an earlier epoch of the room are not sent in the new one', async () => {
  const client = await joined();
  const seen = [];
  client.on('resynced', (e) => seen.push(e));
  const socket = await breakLink(client);
  // Queued while away: actor 1 of the old epoch may be anyone in a new one.
  const direct = client.sendDirect(1, 'for actor 1 of the old epoch');
  client.sendEvent('still sent');
  socket.push(welcome({ actor: 1, offset: 1, epoch: 'epoch-2', members: [[1, 'p-two', {}]] }));
  await tick();
  assert.deepEqual(sentFrames(socket), [[[1, direct + 1, 'still sent']]]);
  assert.deepEqual(seen, [{ actor: 1, previousActor: 2, unsentDirects: [direct] }]);
  // The same epoch keeps them: actors are never reused within one.
  client.sendDirect(1, 'now');
  await tick();
  assert.deepEqual(sentFrames(socket).at(-1), [[3, direct + 2, 1, 'now']]);
});

test('a move the server refused (ERROR with its seq) is not re-sent after a resume', async () => {
  const client = await joined();
  client.on('error', () => {});
  client.sendEvent('accepted');
  const refused = client.sendEvent('out of turn');
  await tick();
  const socket = FakeSocket.last();
  socket.push([7, refused, 'rejected', 'not your turn']);
  await tick();
  const next = await breakLink(client);
  next.push(welcome({ actor: 2, offset: 10, lastSeq: 1 }));
  await tick();
  assert.deepEqual(sentFrames(next), []);
});

test('a held seat that had no move accepted (last_seq nil) gets every move again', async () => {
  const client = await joined();
  client.sendEvent('a');
  client.sendEvent('b');
  await tick();
  const socket = await breakLink(client);
  socket.push(welcome({ actor: 2, offset: 10, lastSeq: null }));
  await tick();
  assert.deepEqual(sentFrames(socket), [
    [
      [1, 1, 'a'],
      [1, 2, 'b'],
    ],
  ]);
});

test('nothing is re-sent when the server has every move', async () => {
  const client = await joined();
  client.sendEvent('a');
  await tick();
  const socket = await breakLink(client);
  socket.push(welcome({ actor: 2, offset: 10, lastSeq: 1 }));
  await tick();
  assert.deepEqual(sentFrames(socket), []);
});

test('moves sent while reconnecting go out after the resume, before newer ones', async () => {
  const client = await joined();
  client.sendEvent('sent');
  await tick();
  const old = FakeSocket.last();
  old.drop(1006);
  const seqs = [client.sendEvent('a'), client.sendState('pos', [2, 2]), client.sendDirect(1, 'b')];
  assert.deepEqual(seqs, [2, 3, 4]);
  assert.deepEqual(client.snapshot.get(2).pos, [2, 2], 'our STATE is applied at once as usual');
  assert.equal(old.sent.length, 1);
  await until(() => FakeSocket.made.length === 2, 1000, 'a reconnect');
  const socket = FakeSocket.last();
  client.on('welcome', () => client.sendEvent('on welcome'));
  socket.push(welcome({ actor: 2, offset: 10, lastSeq: 1 }));
  client.sendEvent('after');
  await tick();
  assert.deepEqual(sentFrames(socket), [
    [
      [1, 2, 'a'],
      [2, 3, 'pos', [2, 2]],
      [3, 4, 1, 'b'],
      [1, 5, 'on welcome'],
      [1, 6, 'after'],
    ],
  ]);
});

test('own STATE re-sent after a fresh snapshot is applied to it again', async () => {
  const client = await joined();
  FakeSocket.last().drop(1006);
  client.sendState('pos', [2, 2]);
  await until(() => FakeSocket.made.length === 2, 1000, 'a reconnect');
  // The server had not got it: its snapshot has no pos of ours.
  FakeSocket.last().push(welcome({ actor: 2, offset: 30, snapshot: {}, lastSeq: null }));
  assert.deepEqual(client.snapshot.get(2).pos, [2, 2]);
});

test('moves queued while reconnecting are bounded, and refused once closed', async () => {
  const client = await joined();
  FakeSocket.last().drop(1006);
  for (let i = 0; i < 1024; i++) client.sendEvent(i);
  assert.throws(() => client.sendEvent('one too many'), RelayError);
  client.close();
  assert.equal(client.status, 'closed');
  assert.throws(() => client.sendState('pos', [0, 0]), /not connected \(status: closed\)/);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(FakeSocket.made.length, 1, 'close() during the backoff stops the reconnect');
});

test('the client does not queue when it will not reconnect', async () => {
  const client = await joined({ reconnect: false });
  FakeSocket.last().drop(1006);
  assert.equal(client.status, 'closed');
  assert.throws(() => client.sendEvent('x'), RelayError);
});
