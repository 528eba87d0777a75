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
Beside it the history keeps what each entry replaced (field ``u``, msgpack, one
item per entry: a STATE's previous raw value or 0 when the key was unset, a
LEAVE's ``[member blob, flat snapshot]``, 0 otherwise), so that any node can
rewind the room to a resuming player's offset for its WELCOME.

Keys of room R with prefix P (tag ``{P:R}``):

========================  =====================================================
``{P:R}:meta``            hash: ``e`` epoch, ``o`` offset, ``a`` next actor,
                          ``n:<node>`` the last batch number applied from a node,
                          ``d`` the number of the last DIRECT
``{P:R}:mem``             hash: actor -> msgpack ``[player, meta]``
``{P:R}:ply``             hash: player -> actor
``{P:R}:nod``             hash: actor -> ``<node>/<join number>``: the node that
                          serves the seat (for reaping, and resume elsewhere)
``{P:R}:tok``             hash: actor -> the secret half of its resume token
``{P:R}:seq``             hash: actor -> the highest seq taken from its seat
``{P:R}:hld``             hash: actor -> ``<deadline ms>/<close code>`` for a seat
                          held after its node went away
``{P:R}:dir:<actor>``     list: DIRECTs sent to such a held seat, kept (the last
                          ``max_held_directs``) for its player's resume
``{P:R}:dirlost:<actor>`` integer: DIRECTs to such a seat that did not fit in that
                          list (its player gets DROPPED with the count)
``{P:R}:s:<actor>``       hash: msgpack(key) -> raw msgpack data (the snapshot)
``{P:R}:log``             stream: the room's recent published batches
``{P:R}:dl``              stream: the room's recent DIRECTs (the last
                          ``history_size``), numbered by ``d`` in ``:meta``,
                          each with the node it was published for: a node
                          whose subscription was cut reads those it missed
``{P:R}:ch``              the pub/sub channel (SPUBLISH in a Redis Cluster)
========================  =====================================================
"""

from __future__ import annotations

from typing import Any

import msgpack

from relay import protocol
from relay.protocol import MsgType
from relay.room import Entry, Member

_KINDS = {k.value: k for k in (MsgType.EVENT, MsgType.STATE, MsgType.JOIN, MsgType.LEAVE)}

# Shared by every script. KEYS[1] is always the room's meta key; the other keys
# are derived from its tag (same slot, so allowed in a Cluster). ARGV[1] is the
# history length.
_PRELUDE = r"""
local tag = string.sub(KEYS[1], 1, -6)
local K_META, K_MEM, K_PLY, K_NOD, K_LOG = KEYS[1], tag .. ':mem', tag .. ':ply', tag .. ':nod', tag .. ':log'
local K_TOK, K_SEQ, K_HLD, K_DL = tag .. ':tok', tag .. ':seq', tag .. ':hld', tag .. ':dl'
local CHANNEL, PUBLISH_COMMAND = tag .. ':ch', '%(publish)s'
local HISTORY = tonumber(ARGV[1])
local EPOCH, OFFSET, FIRST
local out = {}
local undo = {}  -- per entry, what it replaced (kept in the history only; see publish)

local function snap_key(actor) return tag .. ':s:' .. actor end

-- The DIRECTs kept for a held seat and how many did not fit, taken out of Redis
-- (its player is back: a resume elsewhere, or its node taking the seat back).
local function take_kept_directs(actor)
  local kept, lost = tag .. ':dir:' .. actor, tag .. ':dirlost:' .. actor
  local wires, count = redis.call('LRANGE', kept, 0, -1), tonumber(redis.call('GET', lost) or '0')
  redis.call('DEL', kept, lost)
  return wires, count
end
%(migrating)s

local function open_room()
  local meta = redis.call('HMGET', K_META, 'e', 'o')
  if not meta[1] then return false end
  EPOCH, OFFSET = meta[1], tonumber(meta[2])
  FIRST = OFFSET + 1
  return true
end

local function emit(kind, actor, keybin, vlen, head, replaced)
  OFFSET = OFFSET + 1
  undo[#undo + 1] = replaced or 0
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
  redis.call(PUBLISH_COMMAND, CHANNEL, payload)
  if HISTORY > 0 then  -- keeps at least the last HISTORY entries (whole batches)
    redis.call('XADD', K_LOG, 'MINID', '~', '0-' .. math.max(OFFSET - HISTORY, 0), '0-' .. OFFSET,
      'b', payload, 'u', cmsgpack.pack(undo))
  end
end

local function remove_member(actor, code)
  local blob = redis.call('HGET', K_MEM, actor)
  if not blob then return false end
  local player = cmsgpack.unpack(blob)[1]
  local values = redis.call('HGETALL', snap_key(actor))
  redis.call('HDEL', K_MEM, actor)
  redis.call('HDEL', K_NOD, actor)
  redis.call('HDEL', K_TOK, actor)
  redis.call('HDEL', K_SEQ, actor)
  redis.call('HDEL', K_HLD, actor)
  if redis.call('HGET', K_PLY, player) == tostring(actor) then redis.call('HDEL', K_PLY, player) end
  redis.call('DEL', snap_key(actor), tag .. ':dir:' .. actor, tag .. ':dirlost:' .. actor)
  emit(6, actor, '', 0, '\148\6' .. cmsgpack.pack(actor) .. cmsgpack.pack(code), {blob, values})
  return true
end

-- Whether ``node`` serves the seat of ``actor``: 'mine', 'moved' (another node
-- took it over: a resume) or 'gone' (no such member).
local function seat_of(actor, node)
  local seated = redis.call('HGET', K_NOD, actor)
  if not seated then return 'gone' end
  if string.sub(seated, 1, #node + 1) == node .. '/' then return 'mine' end
  return 'moved'
end

-- The room's members hash and its snapshot, flat, as HGETALL gives them.
local function read_members_and_snapshot()
  local members = redis.call('HGETALL', K_MEM)
  local snapshot = {}
  for i = 1, #members, 2 do
    local values = redis.call('HGETALL', snap_key(members[i]))
    if #values > 0 then
      snapshot[#snapshot + 1] = members[i]
      snapshot[#snapshot + 1] = values
    end
  end
  return members, snapshot
end

-- After LEAVEs: an empty room is gone, and comes back with a new epoch.
local function drop_if_empty()
  if redis.call('HLEN', K_MEM) == 0 then
    redis.call('DEL', K_META, K_MEM, K_PLY, K_NOD, K_LOG, K_TOK, K_SEQ, K_HLD, K_DL)
  end
end
"""

# Moves. ARGV: history, epoch, node, batch number, msgpack of the seats' last seqs
# ([actor, seq, ...], or ''), then five per entry: kind, actor, msgpack(key) or '',
# length of data, head. Moves of a seat that another node has taken over since
# (a resume there) are not taken: its player re-sends them there, after last_seq.
# Nor are those of a seat no longer in the room (removed while this node was
# silent, or replaced by its player joining again): they would follow its LEAVE.
# Returns {1, offset, actors whose seats moved away..., -actor for each seat gone},
# {0} for a batch already applied (a retry), {-1} when the room is gone, {-2} when
# it has another epoch.
SEQUENCE = r"""
if not open_room() then return {-1} end
if EPOCH ~= ARGV[2] then return {-2} end
local node = ARGV[3]
local seen = 'n:' .. node
local batch = tonumber(ARGV[4])
if batch <= tonumber(redis.call('HGET', K_META, seen) or '0') then return {0} end
redis.call('HSET', K_META, seen, batch)
local seats, moved = {}, {}
local function seat(actor)
  local s = seats[actor]
  if not s then
    s = seat_of(actor, node)
    seats[actor] = s
    if s == 'moved' then moved[#moved + 1] = actor end
    if s == 'gone' then moved[#moved + 1] = -actor end
  end
  return s
end
for i = 6, #ARGV, 5 do
  local kind, actor, keybin, vlen, head = tonumber(ARGV[i]), tonumber(ARGV[i + 1]), ARGV[i + 2], tonumber(ARGV[i + 3]), ARGV[i + 4]
  if seat(actor) == 'mine' then
    local replaced = 0
    if kind == 2 then
      replaced = redis.call('HGET', snap_key(actor), keybin)  -- false: the key was not set
      local value = string.sub(head, -vlen)
      if value == '\192' then
        redis.call('HDEL', snap_key(actor), keybin)
      else
        redis.call('HSET', snap_key(actor), keybin, value)
      end
    end
    emit(kind, actor, keybin, vlen, head, replaced)
  end
end
if ARGV[5] ~= '' then
  local seqs = cmsgpack.unpack(ARGV[5])
  for i = 1, #seqs, 2 do
    if seat(seqs[i]) == 'mine' then redis.call('HSET', K_SEQ, seqs[i], seqs[i + 1]) end
  end
end
publish()
return {1, OFFSET, unpack(moved)}
"""

# A DIRECT. ARGV: history (unused), node, from actor (or '' for one kept for a
# seat that moved, passed on), its seq, the message to publish ([0, to_actor,
# wire]), to_actor, wire, max_held_directs. A DIRECT to a seat held after its node went away
# (no node serves it) is kept for its player's resume (TAKEOVER hands it over).
# Returns 1, or 0 when the sender's seat is no longer this node's.
DIRECT = r"""
if ARGV[3] ~= '' then
  if seat_of(ARGV[3], ARGV[2]) ~= 'mine' then return 0 end
  -- A node sends a DIRECT again when its reply was lost (a timeout); Redis may have run
  -- the first one all the same. Seqs only grow per seat: a seq already taken is that.
  if tonumber(ARGV[4]) <= tonumber(redis.call('HGET', K_SEQ, ARGV[3]) or '-1') then return 1 end
  redis.call('HSET', K_SEQ, ARGV[3], ARGV[4])
end
local held = redis.call('HGET', K_HLD, ARGV[6])
if held then
  local kept, lost = tag .. ':dir:' .. ARGV[6], tag .. ':dirlost:' .. ARGV[6]
  -- Gone with the seat (its resume or its LEAVE); and at the latest a minute after its
  -- hold ends, should anything ever leave them behind.
  local expiry = tonumber(string.match(held, '^(%d+)/')) + 60000
  local over = redis.call('RPUSH', kept, ARGV[7]) - tonumber(ARGV[8])
  if over > 0 then
    redis.call('LTRIM', kept, -tonumber(ARGV[8]), -1)
    redis.call('INCRBY', lost, over)
    redis.call('PEXPIREAT', lost, expiry)
  end
  redis.call('PEXPIREAT', kept, expiry)
  return 1
end
-- Numbered, and kept a while for the node that serves the seat: pub/sub is at most
-- once, and a node whose subscription was cut reads what it missed from ':dl'.
local n = redis.call('HINCRBY', K_META, 'd', 1)
local seated = redis.call('HGET', K_NOD, ARGV[6])
if HISTORY > 0 and seated then
  redis.call('XADD', K_DL, 'MINID', '~', '0-' .. math.max(n - HISTORY, 0), '0-' .. n,
    'n', string.match(seated, '^[^/]*'), 'a', ARGV[6], 'w', ARGV[7])
end
redis.call(PUBLISH_COMMAND, CHANNEL, cmsgpack.pack({0, tonumber(ARGV[6]), ARGV[7], n}))
return 1
"""

# Seat a player. ARGV: history, new epoch (if the room is new), node, join
# number, player, msgpack [player, meta], msgpack(player) .. msgpack(meta), max
# players, the secret half of its resume token.
# Returns {1, actor, epoch, offset, members (flat actor, blob), snapshot (flat actor,
# flat key, value)}, or {-3} when the room is full.
JOIN = r"""
if not open_room() then
  redis.call('DEL', K_MEM, K_PLY, K_NOD, K_LOG, K_TOK, K_SEQ, K_HLD)
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
redis.call('HSET', K_TOK, actor, ARGV[9])
emit(5, actor, '', 0, '\149\5' .. cmsgpack.pack(actor) .. ARGV[7])
publish()
local members, snapshot = read_members_and_snapshot()
return {1, actor, EPOCH, OFFSET, members, snapshot}
"""

# Take a seat over for a resume on this node: wherever it was served, or held,
# it is this node's from now on. ARGV: history, node, join number, actor, token
# secret, player. The node that served it hears [1, actor, node] on the room's
# channel and lets it go without a LEAVE. Returns {1, epoch, offset, members,
# snapshot, last seq or nil, DIRECTs kept for the seat while it was held, how many
# more did not fit}, or {0} when there is no such seat (or the secret or the player
# does not match).
TAKEOVER = r"""
if not open_room() then return {0} end
local actor = ARGV[4]
local secret = redis.call('HGET', K_TOK, actor)
local blob = redis.call('HGET', K_MEM, actor)
if not secret or secret ~= ARGV[5] or not blob or cmsgpack.unpack(blob)[1] ~= ARGV[6] then return {0} end
redis.call('HSET', K_NOD, actor, ARGV[2] .. '/' .. ARGV[3])
redis.call('HDEL', K_HLD, actor)
local kept, lost = take_kept_directs(actor)
redis.call(PUBLISH_COMMAND, CHANNEL, cmsgpack.pack({1, tonumber(actor), ARGV[2]}))
local members, snapshot = read_members_and_snapshot()
return {1, EPOCH, OFFSET, members, snapshot, redis.call('HGET', K_SEQ, actor), kept, lost}
"""

# Remove one member, if this node still serves it. ARGV: history, epoch, actor,
# close code, node. Returns {1} or {0}.
LEAVE = r"""
if not open_room() or EPOCH ~= ARGV[2] then return {0} end
local removed = seat_of(ARGV[3], ARGV[5]) == 'mine' and remove_member(tonumber(ARGV[3]), tonumber(ARGV[4]))
publish()
drop_if_empty()
return {removed and 1 or 0}
"""

# The seats served by a node that is gone, or by one join of it (a join whose
# reply was lost). ARGV: history, '<node>/' (a prefix) or '<node>/<join number>'
# (exact), close code, hold (ms). With hold 0 they are removed (LEAVE with the
# close code). Else each is held until hold ms from the first call that finds
# it, for its player to resume on another node, and removed by the first call
# after that (LEAVE with the close code of the first call). Returns {removed,
# still held}.
RELEASE_SEATED_BY = r"""
if not open_room() then return {0, 0} end
local who, code, hold, exact = ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4]), string.sub(ARGV[2], -1) ~= '/'
local now = 0
if hold > 0 then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local seats = redis.call('HGETALL', K_NOD)
local removed, held = 0, 0
for i = 1, #seats, 2 do
  local seated = seats[i + 1]
  if (exact and seated == who) or (not exact and string.sub(seated, 1, #who) == who) then
    local actor = tonumber(seats[i])
    -- A node handing its own seats over (ARGV[5] = 1) starts their window now.
    local holding = hold > 0 and ARGV[5] ~= '1' and redis.call('HGET', K_HLD, actor)
    if hold <= 0 then
      remove_member(actor, code)
      removed = removed + 1
    elseif not holding then
      redis.call('HSET', K_HLD, actor, string.format('%d/%d', now + hold, code))
      held = held + 1
    else
      local deadline, why = string.match(holding, '^(%d+)/(%d+)$')
      if tonumber(deadline) <= now then
        remove_member(actor, tonumber(why))
        removed = removed + 1
      else
        held = held + 1
      end
    end
  end
end
publish()
drop_if_empty()
return {removed, held}
"""

# This node is back after the others took it for dead (its heartbeat had
# expired): the seats they hold for a resume elsewhere, and that it still serves,
# are its own again, and DIRECTs to them are published, not kept. ARGV: history
# (unused), '<node>/'. Returns how many seats it took back.
RECLAIM = r"""
local who, taken = ARGV[2], 0
local seats = redis.call('HGETALL', K_NOD)
for i = 1, #seats, 2 do
  if string.sub(seats[i + 1], 1, #who) == who and redis.call('HDEL', K_HLD, seats[i]) == 1 then
    taken = taken + 1
    -- The DIRECTs kept for the seat while it was held go to it now, through the room's
    -- channel like any other DIRECT (its player never left, so no TAKEOVER hands them over).
    local actor = tonumber(seats[i])
    local kept, lost = take_kept_directs(seats[i])
    if lost > 0 then
      redis.call(PUBLISH_COMMAND, CHANNEL, cmsgpack.pack({0, actor, cmsgpack.pack({8, lost})}))
    end
    for _, wire in ipairs(kept) do
      redis.call(PUBLISH_COMMAND, CHANNEL, cmsgpack.pack({0, actor, wire}))
    end
  end
end
return taken
"""

# Read the room. ARGV: history (unused), offset after which to return the
# history (-1: none). Returns {} for no room, else {epoch, offset, members,
# snapshot, batches, undos} with batches the published messages whose last offset
# is past the given one, oldest first, and for each its undo record (see publish).
READ = r"""
if not open_room() then return {} end
local members, snapshot = read_members_and_snapshot()
local batches, undos = {}, {}
local after = tonumber(ARGV[2])
if after >= 0 and after < OFFSET then
  for _, item in ipairs(redis.call('XRANGE', K_LOG, '0-' .. (after + 1), '+')) do
    batches[#batches + 1] = item[2][2]
    undos[#undos + 1] = item[2][4] or ''  -- '': written before the history kept undo
  end
end
-- A node repairing the room (ARGV[3] its id) also gets the DIRECTs published for it
-- after number ARGV[4]: {number, to_actor, wire, ...}.
local directs = {}
if ARGV[3] then
  for _, item in ipairs(redis.call('XRANGE', K_DL, '0-' .. (tonumber(ARGV[4]) + 1), '+')) do
    local f = item[2]
    if f[2] == ARGV[3] then
      directs[#directs + 1] = tonumber(string.sub(item[1], 3))
      directs[#directs + 1] = tonumber(f[4])
      directs[#directs + 1] = f[6]
    end
  end
end
return {EPOCH, OFFSET, members, snapshot, batches, undos, directs}
"""


def source(body: str, *, sharded: bool) -> str:
    """A script's full text: the shared prelude, then its body."""
    return _PRELUDE % {"publish": "SPUBLISH" if sharded else "PUBLISH", "migrating": _MIGRATING if sharded else ""} + body


# In a Cluster slot being migrated, a node serves only the keys it still holds: a
# script that meets one already moved fails half way, and Redis keeps what it wrote
# until then (a batch marked as applied but not published, a member half removed).
# A key that never exists is "already moved" too, so asking for one first makes such
# a script fail before it writes anything; the backplane runs it again once the slot
# has settled (cluster_moving). Elsewhere the call costs one lookup.
_MIGRATING = "redis.call('EXISTS', tag .. ':never')  -- fails at once in a slot being migrated"


# --- the Python side of the published message ------------------------------------


def offset_len(offset: int) -> int:
    """Bytes of msgpack(offset): where the raw data ends inside an entry's wire bytes."""
    return 1 if offset < 0x80 else 2 if offset < 0x100 else 3 if offset < 0x10000 else 5 if offset < 1 << 32 else 9


def decode_batch(items: list[Any], first: int, undo: bytes = b"") -> list[Entry]:
    """Entries of a published batch: [epoch, first, (kind, actor, key, value_len, wire)*];
    ``undo``: the batch's undo record from the room's history (see the module's doc)."""
    entries = []
    offset = first
    unpack = msgpack.unpackb
    for i in range(2, len(items), 5):
        kind, actor, keybin, vlen, wire = items[i : i + 5]
        msg_type = _KINDS[kind]
        if msg_type is protocol.JOIN:
            _, _, player, meta, _ = unpack(wire, raw=False, strict_map_key=False)
            entry = Entry(msg_type, actor, b"", member=Member(actor, player, meta), offset=offset, wire=wire)
        elif msg_type is protocol.LEAVE:
            entry = Entry(msg_type, actor, b"", offset=offset, wire=wire)
        else:
            end = len(wire) - offset_len(offset)
            value = wire[end - vlen : end]
            key = unpack(keybin, raw=False, strict_map_key=False) if msg_type is protocol.STATE else None
            entry = Entry(msg_type, actor, b"", key=key, value=value, offset=offset, wire=wire)
        entries.append(entry)
        offset += 1
    if undo:
        for entry, replaced in zip(entries, msgpack.unpackb(undo, raw=True), strict=True):
            entry.undo = (_replaced(entry, replaced),)
    return entries


def _replaced(entry: Entry, replaced: Any) -> Any:
    """An undo record item as RoomState's undo log keeps it."""
    if entry.kind is protocol.STATE:
        return replaced if type(replaced) is bytes else None  # 0: the key was not set
    if entry.kind is protocol.LEAVE:
        blob, flat = replaced
        player, meta = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        return Member(entry.actor, player, meta), _decode_values(flat)
    return None


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
        snapshot[int(flat[i])] = _decode_values(flat[i + 1])
    return snapshot


def _decode_values(flat: list[Any]) -> dict[str | int, bytes]:
    """One member's snapshot as HGETALL gives it: msgpack(key), raw value, ..."""
    return {msgpack.unpackb(flat[j], raw=False, strict_map_key=False): flat[j + 1] for j in range(0, len(flat), 2)}
