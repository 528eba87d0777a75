// relay/static/client.js is committed so that the Python package serves it
// without npm; these tests catch a bundle that was not rebuilt or that broke.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { test } from 'node:test';

import { FakeSocket, welcome } from '../test-support/fake-socket.js';

const { OUTFILE, bundle } = await import('../build.mjs').catch(() => ({}));

test(
  'the committed bundle is what the sources build to',
  { skip: !bundle && 'esbuild is not installed (npm ci)' },
  async () => {
    assert.ok(
      readFileSync(OUTFILE, 'utf8') === (await bundle()),
      "relay/static/client.js is out of date: run 'npm run build' in clients/js",
    );
  },
);

test('the bundle works on its own: it joins a room and decodes a batched frame', async () => {
  const { connect } = await import('../../../relay/static/client.js');
  const pending = connect({ url: 'http://relay.test', room: 'grid:b', WebSocket: FakeSocket });
  FakeSocket.last().push(welcome(), [2, 1, 'pos', [7, 7], 11]);
  const client = await pending;
  assert.deepEqual(client.snapshot.get(1).pos, [7, 7]);
  client.sendState('pos', [1, 1]);
  client.sendEvent('x');
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(FakeSocket.last().sent.length, 1);
});
