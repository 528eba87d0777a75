import assert from 'node:assert/strict';
import { test } from 'node:test';
import { decodeMulti, encode } from '@msgpack/msgpack';

import * as codec from '../src/codec.js';
import { concat } from '../test-support/fake-socket.js';

const bytes = (...b) => Uint8Array.from(b);
const str = (s) => [...new TextEncoder().encode(s)];

test('client messages encode to the protocol shapes', () => {
  assert.deepEqual(
    codec.encodeMessage(codec.event(1, 'hi')),
    bytes(0x93, 0x01, 0x01, 0xa2, ...str('hi')),
  );
  assert.deepEqual(
    codec.encodeMessage(codec.state(2, 'pos', [3, 4])),
    bytes(0x94, 0x02, 0x02, 0xa3, ...str('pos'), 0x92, 0x03, 0x04),
  );
  assert.deepEqual(
    codec.encodeMessage(codec.state(3, 'pos', null)),
    bytes(0x94, 0x02, 0x03, 0xa3, ...str('pos'), 0xc0),
  );
  assert.deepEqual(
    codec.encodeMessage(codec.direct(4, 7, true)),
    bytes(0x94, 0x03, 0x04, 0x07, 0xc3),
  );
});

test('several messages go out back to back in one frame', () => {
  const frames = codec.encodeFrames([codec.event(1, 'a'), codec.state(2, 'k', 5), codec.ping(1.5)]);
  assert.equal(frames.length, 1);
  assert.deepEqual(
    [...decodeMulti(frames[0])],
    [
      [1, 1, 'a'],
      [2, 2, 'k', 5],
      [9, 1.5],
    ],
  );
});

test('a batch larger than max_frame_bytes is split between messages, never inside one', () => {
  const messages = Array.from({ length: 10 }, (_, i) => codec.event(i + 1, 'x'.repeat(20)));
  const frames = codec.encodeFrames(messages, 60);
  assert.ok(frames.length > 1);
  for (const f of frames) assert.ok(f.length <= 60, `frame of ${f.length} bytes`);
  assert.deepEqual(
    frames.flatMap((f) => [...decodeMulti(f)]),
    messages,
  );
});

test('a server frame with several messages decodes to all of them, in order', () => {
  const frame = concat([
    encode([5, 3, 'p-three', { name: 'Three' }, 11]),
    encode([2, 3, 'pos', [1, 2], 12]),
    encode([1, 3, 7, { t: 'boom' }, 13]),
    encode([6, 3, 1001, 14]),
  ]);
  assert.deepEqual(codec.decodeFrame(frame), [
    { type: 'join', actor: 3, player: 'p-three', meta: { name: 'Three' }, offset: 11 },
    { type: 'state', from: 3, key: 'pos', data: [1, 2], offset: 12 },
    { type: 'event', from: 3, seq: 7, data: { t: 'boom' }, offset: 13 },
    { type: 'leave', actor: 3, code: 1001, offset: 14 },
  ]);
});

test('WELCOME: snapshot keyed by actor numbers, members as objects', () => {
  const w = codec.decodeFrame(
    encode([
      0,
      1,
      2,
      'grid:a',
      [
        [1, 'p1', { name: 'A' }],
        [2, 'p2', {}],
      ],
      { 1: { pos: [0, 0], hp: 3 } },
      1700000000000,
      { max_frame_bytes: 100 },
      5,
      'ep',
      'tok',
      null,
    ]),
  )[0];
  assert.equal(w.type, 'welcome');
  assert.equal(w.actor, 2);
  assert.deepEqual(w.members, [
    { actor: 1, player: 'p1', meta: { name: 'A' } },
    { actor: 2, player: 'p2', meta: {} },
  ]);
  assert.deepEqual([...w.snapshot.keys()], [1]);
  assert.deepEqual({ ...w.snapshot.get(1) }, { pos: [0, 0], hp: 3 });
  assert.equal(w.offset, 5);
  assert.equal(w.epoch, 'ep');
  assert.equal(w.lastSeq, null);
});

test('unknown message types, trailing elements and non-arrays are ignored', () => {
  const frame = concat([
    encode([42, 'future']),
    encode('junk'),
    encode([8, 3, 'later field']),
    encode([9, 1.25, 99, 'x']),
  ]);
  assert.deepEqual(codec.decodeFrame(frame), [
    { type: 'dropped', count: 3 },
    { type: 'pong', clientTime: 1.25, serverTime: 99 },
  ]);
});

test('a "__proto__" key in one player\'s data does not cost the rest of the frame', () => {
  // [2, 1, "k", {"__proto__": 1}, 5] written by hand: JS cannot build that map.
  const evil = bytes(
    0x95,
    0x02,
    0x01,
    0xa1,
    ...str('k'),
    0x81,
    0xa9,
    ...str('__proto__'),
    0x01,
    0x05,
  );
  const frame = concat([evil, encode([2, 2, 'pos', [1, 1], 6])]);
  const [first, second] = codec.decodeFrame(frame);
  assert.equal(first.data[codec.PROTO_KEY], 1);
  assert.equal(Object.getPrototypeOf(first.data), Object.prototype);
  assert.deepEqual(second, { type: 'state', from: 2, key: 'pos', data: [1, 1], offset: 6 });
});

test('a truncated frame throws', () => {
  assert.throws(() => codec.decodeFrame(encode([1, 1, 1, 'abc', 2]).subarray(0, 5)));
});

test('reconnect only on close codes where retrying can help', () => {
  for (const code of [1001, 1006, 1011, 1013, 4008])
    assert.ok(codec.shouldReconnect(code), `${code}`);
  for (const code of [1000, 1003, 1008, 1009, 4001, 4003, 4009, 4400, 4409])
    assert.ok(!codec.shouldReconnect(code), `${code}`);
});
