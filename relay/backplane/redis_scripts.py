"""The Lua scripts that make each room's order inside Redis.

Every script works on one room, and every key it touches carries the room's hash
tag ``{prefix:room}``, so a room lives on one Redis Cluster shard and a script
runs there atomically. A script that changes the room sequences its entries
(each gets the next offset; its wire bytes become ``head .. msgpack(offset)``),
applies them to the room's members and snapshot, and publishes them as one
message on the room's channel. The message is a msgpack array::

    [epoch, first_offset, kind, actor, key, value_len, wire, kind, actor, ...]

five items per entry: the entry's type, its actor, its STATE key as msgpack
bytes (empty otherwise), the length of its raw ``data`` (the tail of the head),
and its complete wire bytes. ``data`` is never decoded, in Lua or on the nodes.
The same message is appended to the room's recent history (a stream whose ids
are ``0-<last offset>``, trimmed to about ``history_size`` entries), from which
a node that lost its subscription replays what it missed, and a player resumes.

Keys of room R with prefix P (tag ``{P:R}``):

========================  =====================================================
``{P:R}:meta``            hash: ``e`` epoch, ``o`` offset, ``a`` next actor,
                          ``n:<node>`` the last batch number applied from a node
``{P:R}:mem``             hash: actor -> msgpack ``[player, meta]``
``{P:R}:ply``             hash: player -> actor
``{P:R}:nod``             hash: actor -> ``<node>/<join number>`` (for reaping)
``{P:R}:s:<actor>``       hash: msgpack(key) -> raw msgpack data (the snapshot)
``{P:R}:log``             stream: the room's recent published batches
``{P:R}:ch``              the pub/sub channel (SPUBLISH in a Redis Cluster)
========================  =====================================================
"""

from __future__ import annotations

from typing import Any

import msgpack

from relay.protocol import MsgType
from relay.room import Entry, Member

_KINDS = {k.value: k for k in (MsgType.EVENT, MsgType.STATE, MsgType.JOIN, MsgType.LEAVE)}

# Shared by every script. KEYS[1] is always the room's meta key; the other keys
# are derived from its tag (same slot, so allowed in a Cluster). ARGV[1] is the
# history length.
_PRELUDE = r"""
local tag = string.sub(KEYS[1], 1, -6)
local K_META, K_MEM, K_PLY, K_NOD, K_LOG = KEYS[1], tag .. ':mem', tag .. ':ply', tag .. ':nod', tag .. ':log'
local CHANNEL = tag .. ':ch'
local HISTORY = tonumber(ARGV[1])
local EPOCH, OFFSET, FIRST
local out = {}

local function snap_key(actor) return tag .. ':s:' .. actor end

local function open_room()
  local meta = redis.call('HMGET', K_META, 'e', 'o')
  if not meta[1] then return false end
  EPOCH, OFFSET = meta[1], tonumber(meta[2])
  FIRST = OFFSET + 1
  return true
end

local function emit(kind, actor, keybin, vlen, head)
  OFFSET = OFFSET + 1
  local n = #out
  out[n + 1] = kind
  out[n + 2] = actor
  out[n + 3] = keybin
  out[n + 4] = vlen
  out[n + 5] = head .. cmsgpack.pack(OFFSET)
end

-- One message per script call: publish it and keep it in the room's history.
local function publish()
  if #out == 0 then return end
  redis.call('HSET', K_META, 'o', OFFSET)
  local msg = {EPOCH, FIRST}
  for i = 1, #out do msg[i + 2] = out[i] end
  local payload = cmsgpack.pack(msg)
  redis.call('%(publish)s', CHANNEL, payload)
  if HISTORY > 0 then  -- keeps at least the last HISTORY entries (whole batches)
    redis.call('XADD', K_LOG, 'MINID', '~', '0-' .. math.max(OFFSET - HISTORY, 0), '0-' .. OFFSET, 'b', payload)
  end
end

local function remove_member(actor, code)
  local blob = redis.call('HGET', K_MEM, actor)
  if not blob then return false end
  local player = cmsgpack.unpack(blob)[1]
  redis.call('HDEL', K_MEM, actor)
  redis.call('HDEL', K_NOD, actor)
  if redis.call('HGET', K_PLY, player) == tostring(actor) then redis.call('HDEL', K_PLY, player) end
  redis.call('DEL', snap_key(actor))
  emit(6, actor, '', 0, '\148\6' .. cmsgpack.pack(actor) .. cmsgpack.pack(code))
  return true
end

-- After LEAVEs: an empty room is gone, and comes back with a new epoch.
local function drop_if_empty()
  if redis.call('HLEN', K_MEM) == 0 then
    redis.call('DEL', K_META, K_MEM, K_PLY, K_NOD, K_LOG)
  end
end
"""

# Moves. ARGV: history, epoch, node, batch number, then five per entry:
# kind, actor, msgpack(key) or '', length of data, head.
# Returns {1, offset}, {0} for a batch already applied (a retry), {-1} when the
# room is gone, {-2} when it has another epoch.
SEQUENCE = r"""
if not open_room() then return {-1} end
if EPOCH ~= ARGV[2] then return {-2} end
local seen = 'n:' .. ARGV[3]
local batch = tonumber(ARGV[4])
if batch <= tonumber(redis.call('HGET', K_META, seen) or '0') then return {0} end
redis.call('HSET', K_META, seen, batch)
for i = 5, #ARGV, 5 do
  local kind, actor, keybin, vlen, head = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4]
  -- A late STATE from a member that already left changes nothing (as in RoomState.apply).
  if kind == 2 and redis.call('HEXISTS', K_MEM, actor) == 1 then
    local value = string.sub(head, -vlen)
    if value == '\192' then
      redis.call('HDEL', snap_key(actor), keybin)
    else
      redis.call('HSET', snap_key(actor), keybin, value)
    end
  end
  emit(kind, actor, keybin, vlen, head)
end
publish()
return {1, OFFSET}
"""

# Seat a player. ARGV: history, new epoch (if the room is new), node, join
# number, player, msgpack [player, meta], msgpack(player) .. msgpack(meta), max players.
# Returns {1, actor, epoch, offset, members (flat actor, blob), snapshot (flat actor,
# flat key, value)}, or {-3} when the room is full.
JOIN = r"""
if not open_room() then
  redis.call('DEL', K_MEM, K_PLY, K_NOD, K_LOG)
  redis.call('HSET', K_META, 'e', ARGV[2], 'o', 0, 'a', 1)
  open_room()
end
local player = ARGV[5]
local old = redis.call('HGET', K_PLY, player)
if not old and redis.call('HLEN', K_MEM) >= tonumber(ARGV[8]) then
  drop_if_empty()
  return {-3}
end
if old then remove_member(tonumber(old), 4409) end
local actor = redis.call('HINCRBY', K_META, 'a', 1) - 1
redis.call('HSET', K_MEM, actor, ARGV[6])
redis.call('HSET', K_PLY, player, actor)
redis.call('HSET', K_NOD, actor, ARGV[3] .. '/' .. ARGV[4])
emit(5, actor, '', 0, '\149\5' .. cmsgpack.pack(actor) .. ARGV[7])
publish()
local members = redis.call('HGETALL', K_MEM)
local snapshot = {}
for i = 1, #members, 2 do
  local values = redis.call('HGETALL', snap_key(members[i]))
  if #values > 0 then
    snapshot[#snapshot + 1] = members[i]
    snapshot[#snapshot + 1] = values
  end
end
return {1, actor, EPOCH, OFFSET, members, snapshot}
"""

# Remove one member. ARGV: history, epoch, actor, close code. Returns {1} or {0}.
LEAVE = r"""
if not open_room() or EPOCH ~= ARGV[2] then return {0} end
local removed = remove_member(tonumber(ARGV[3]), tonumber(ARGV[4]))
publish()
drop_if_empty()
return {removed and 1 or 0}
"""

# Remove every member seated by a node, or by one join of it (a join whose reply
# was lost). ARGV: history, '<node>/' (a prefix) or '<node>/<join number>' (exact),
# close code. Returns {number removed}.
REMOVE_SEATED_BY = r"""
if not open_room() then return {0} end
local who, code, exact = ARGV[2], tonumber(ARGV[3]), string.sub(ARGV[2], -1) ~= '/'
local seats = redis.call('HGETALL', K_NOD)
local removed = 0
for i = 1, #seats, 2 do
  local seated = seats[i + 1]
  if (exact and seated == who) or (not exact and string.sub(seated, 1, #who) == who) then
    remove_member(tonumber(seats[i]), code)
    removed = removed + 1
  end
end
publish()
drop_if_empty()
return {removed}
"""

# Read the room. ARGV: history (unused), offset after which to return the
# history (-1: none). Returns {} for no room, else {epoch, offset, members,
# snapshot, batches} with batches the published messages whose last offset is
# past the given one, oldest first.
READ = r"""
if not open_room() then return {} end
local members = redis.call('HGETALL', K_MEM)
local snapshot = {}
for i = 1, #members, 2 do
  local values = redis.call('HGETALL', snap_key(members[i]))
  if #values > 0 then
    snapshot[#snapshot + 1] = members[i]
    snapshot[#snapshot + 1] = values
  end
end
local batches = {}
local after = tonumber(ARGV[2])
if after >= 0 and after < OFFSET then
  for _, item in ipairs(redis.call('XRANGE', K_LOG, '0-' .. (after + 1), '+')) do
    batches[#batches + 1] = item[2][2]
  end
end
return {EPOCH, OFFSET, members, snapshot, batches}
"""


def source(body: str, *, sharded: bool) -> str:
    """A script's full text: the shared prelude, then its body."""
    return _PRELUDE % {"publish": "SPUBLISH" if sharded else "PUBLISH"} + body


# --- the Python side of the published message ------------------------------------


def offset_len(offset: int) -> int:
    """Bytes of msgpack(offset): where the raw data ends inside an entry's wire bytes."""
    return 1 if offset < 0x80 else 2 if offset < 0x100 else 3 if offset < 0x10000 else 5 if offset < 1 << 32 else 9


def decode_batch(items: list[Any], first: int) -> list[Entry]:
    """Entries of a published batch: [epoch, first, (kind, actor, key, value_len, wire)*]."""
    entries = []
    offset = first
    unpack = msgpack.unpackb
    for i in range(2, len(items), 5):
        kind, actor, keybin, vlen, wire = items[i : i + 5]
        msg_type = _KINDS[kind]
        if msg_type is MsgType.JOIN:
            _, _, player, meta, _ = unpack(wire, raw=False, strict_map_key=False)
            entry = Entry(msg_type, actor, b"", member=Member(actor, player, meta), offset=offset, wire=wire)
        elif msg_type is MsgType.LEAVE:
            entry = Entry(msg_type, actor, b"", offset=offset, wire=wire)
        else:
            end = len(wire) - offset_len(offset)
            value = wire[end - vlen : end]
            key = unpack(keybin, raw=False, strict_map_key=False) if msg_type is MsgType.STATE else None
            entry = Entry(msg_type, actor, b"", key=key, value=value, offset=offset, wire=wire)
        entries.append(entry)
        offset += 1
    return entries


def decode_members(flat: list[Any]) -> list[tuple[int, str, dict[str, Any]]]:
    members = []
    for i in range(0, len(flat), 2):
        player, meta = msgpack.unpackb(flat[i + 1], raw=False, strict_map_key=False)
        members.append((int(flat[i]), player, meta))
    members.sort()
    return members


def decode_snapshot(flat: list[Any]) -> dict[int, dict[str | int, bytes]]:
    snapshot: dict[int, dict[str | int, bytes]] = {}
    for i in range(0, len(flat), 2):
        values = flat[i + 1]
        snapshot[int(flat[i])] = {
            msgpack.unpackb(values[j], raw=False, strict_map_key=False): values[j + 1]
            for j in range(0, len(values), 2)
        }
    return snapshot
