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

/** A client that has had its WELCOME. */
async function joined(options = {}, w = welcome()) {
  const pending = connect({ ...BASE, ...options });
  FakeSocket.last().push(w);
  return pending;
}

/** Every message the client sent on a socket, per frame. */
const sentFrames = (socket) => socket.sent.map((f) => [...decodeMulti(f)]);
const tick = () => new Promise((r) => setTimeout(r, 0));

afterEach(() => {
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

test('a broken connection is rejoined with backoff and a fresh snapshot', async () => {
  const client = await joined();
  client.sendEvent('before');
  const events = [];
  for (const type of ['close', 'reconnecting', 'resynced'])
    client.on(type, (e) => events.push([type, e]));
  const pings = client.ping();
  FakeSocket.last().drop(1006);
  await assert.rejects(pings, RelayError);
  assert.equal(client.status, 'reconnecting');
  assert.throws(() => client.sendEvent(1), /not connected/);
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
  assert.deepEqual(events[4][1], { actor: 5, previousActor: 2 });
  assert.equal(client.sendEvent('again'), 2, 'seq keeps increasing across connections');
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
