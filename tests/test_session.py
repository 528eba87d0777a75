"""relay.session: seq order, the token-bucket rate limit and the error budget.

Time is passed in, so every test drives a fake clock: no sleeps.
"""

from __future__ import annotations

import pytest

from relay.config import Settings
from relay.protocol import CloseCode, ErrorCode, Event, Invalid, Ping, State, decode_frame
from relay.session import Session, seq_of

ROOMY = dict(max_msgs_per_s=1000.0, burst=1000)  # a rate limit the seq tests never reach


def session(now: float = 0.0, **settings: object) -> Session:
    return Session(Settings(**settings), now)  # type: ignore[arg-type]


def code(result: Invalid | None) -> ErrorCode | None:
    return None if result is None else result.code


# --- seq ----------------------------------------------------------------------------


def take(s: Session, seq: int | None, now: float):
    """Admit a message the way the server does: a move that passes is then accepted."""
    result = s.admit(seq, now)
    if result is None and seq is not None:
        s.accepted(seq)
    return result


def test_an_admitted_move_that_is_rejected_later_does_not_advance_last_seq() -> None:
    s = session(**ROOMY)
    take(s, 5, 0.0)
    assert s.admit(9, 0.0) is None  # passes the checks, then refused (rules, no such actor)
    assert s.last_seq == 5
    assert take(s, 6, 0.0) is None


def test_first_seq_is_accepted_whatever_it_is() -> None:
    for first in (0, 1, -5, 2**63):
        s = session(**ROOMY)
        assert s.last_seq is None
        assert take(s, first, 0.0) is None
        assert s.last_seq == first


def test_seq_must_strictly_increase() -> None:
    s = session(**ROOMY)
    assert take(s, 1, 0.0) is None
    assert take(s, 2, 0.0) is None
    assert take(s, 10, 0.0) is None  # gaps are fine
    same = take(s, 10, 0.0)
    assert isinstance(same, Invalid)
    assert (same.seq, same.code) == (10, ErrorCode.BAD_SEQ)
    lower = take(s, 3, 0.0)
    assert isinstance(lower, Invalid)
    assert (lower.seq, lower.code) == (3, ErrorCode.BAD_SEQ)
    assert s.last_seq == 10


def test_rejected_seq_does_not_advance_last_seq() -> None:
    s = session(**ROOMY)
    take(s, 5, 0.0)
    assert code(take(s, 4, 0.0)) is ErrorCode.BAD_SEQ
    assert s.last_seq == 5
    assert take(s, 6, 0.0) is None  # 6 is still next, not something after 4
    assert s.last_seq == 6


def test_ping_has_no_seq_and_does_not_touch_last_seq() -> None:
    s = session(**ROOMY)
    take(s, 7, 0.0)
    assert take(s, None, 0.0) is None
    assert take(s, None, 0.0) is None
    assert s.last_seq == 7
    assert code(take(s, 7, 0.0)) is ErrorCode.BAD_SEQ


def test_decoded_frame_through_admit() -> None:
    s = session(**ROOMY)
    frame = b"\x93\x01\x01\xa1a" + b"\x92\x09\x00" + b"\x93\x01\x01\xa1b" + b"\x94\x02\x02\xa1k\x00"
    results = [take(s, seq_of(m), 0.0) for m in decode_frame(frame, max_message_bytes=100)]
    assert [code(r) for r in results] == [None, None, ErrorCode.BAD_SEQ, None]
    assert s.last_seq == 2


def test_seq_of() -> None:
    assert seq_of(Event(3, b"\x00")) == 3
    assert seq_of(State(4, "k", b"\x00")) == 4
    assert seq_of(Ping(b"\x05")) is None
    assert seq_of(Invalid(9, ErrorCode.TOO_LARGE, "x")) == 9
    assert seq_of(Invalid(None, ErrorCode.MALFORMED, "x")) is None


# --- rate ---------------------------------------------------------------------------


def test_burst_then_rate_limited() -> None:
    s = session(max_msgs_per_s=10.0, burst=5)
    assert [take(s, seq, 0.0) for seq in range(1, 6)] == [None] * 5
    limited = take(s, 6, 0.0)
    assert isinstance(limited, Invalid)
    assert (limited.seq, limited.code) == (6, ErrorCode.RATE_LIMITED)


def test_rate_limited_seq_is_not_taken() -> None:
    s = session(max_msgs_per_s=10.0, burst=1)
    assert take(s, 1, 0.0) is None
    assert code(take(s, 2, 0.0)) is ErrorCode.RATE_LIMITED
    assert s.last_seq == 1
    assert take(s, 2, 0.5) is None  # the same seq again, once a token is back


def test_pings_count_against_the_rate() -> None:
    s = session(max_msgs_per_s=10.0, burst=2)
    assert take(s, None, 0.0) is None
    assert take(s, None, 0.0) is None
    assert code(take(s, None, 0.0)) is ErrorCode.RATE_LIMITED


def test_tokens_refill_at_the_sustained_rate() -> None:
    s = session(max_msgs_per_s=10.0, burst=5)
    seq = 0

    def send(now: float) -> ErrorCode | None:
        nonlocal seq
        seq += 1
        return code(take(s, seq, now))

    for _ in range(5):
        assert send(0.0) is None
    assert send(0.0) is ErrorCode.RATE_LIMITED
    assert send(0.05) is ErrorCode.RATE_LIMITED  # half a token
    assert send(0.15) is None  # 1.5 tokens by now
    assert send(0.16) is ErrorCode.RATE_LIMITED
    assert send(0.25) is None


def test_refill_is_capped_at_burst() -> None:
    s = session(max_msgs_per_s=10.0, burst=3)
    results = [code(take(s, seq, 1000.0)) for seq in range(1, 6)]  # idle for a long time first
    assert results == [None, None, None, ErrorCode.RATE_LIMITED, ErrorCode.RATE_LIMITED]


def test_sustained_rate_is_admitted_forever() -> None:
    s = session(max_msgs_per_s=100.0, burst=1)
    for i in range(1, 2000):
        assert take(s, i, i * 0.0101) is None  # just under 100/s (exactly 100/s is float luck)


def test_faster_than_the_rate_is_limited_to_the_rate() -> None:
    s = session(max_msgs_per_s=10.0, burst=10)
    admitted = sum(take(s, i, i * 0.01) is None for i in range(1, 1001))  # 100/s for 10 s
    assert 10 + 95 <= admitted <= 10 + 101


# --- bytes per second, checked per frame before decoding ------------------------------


def test_frames_within_the_byte_burst_are_admitted_then_limited() -> None:
    s = session(max_bytes_per_s=100, burst_bytes=300, max_frame_bytes=300, max_message_bytes=300)
    assert s.admit_frame(200, 0.0) is None
    limited = s.admit_frame(200, 0.0)
    assert isinstance(limited, Invalid)
    assert (limited.seq, limited.code) == (None, ErrorCode.RATE_LIMITED)
    assert s.admit_frame(100, 0.0) is None  # the refused frame took no bytes


def test_byte_budget_refills_at_the_rate_up_to_the_burst() -> None:
    s = session(max_bytes_per_s=100, burst_bytes=300, max_frame_bytes=300, max_message_bytes=300)
    assert s.admit_frame(300, 0.0) is None
    assert code(s.admit_frame(60, 0.5)) is ErrorCode.RATE_LIMITED  # 50 bytes back
    assert s.admit_frame(60, 1.0) is None  # 100 back
    assert s.admit_frame(300, 100.0) is None  # capped at the burst
    assert code(s.admit_frame(1, 100.0)) is ErrorCode.RATE_LIMITED


def test_byte_and_message_budgets_are_separate() -> None:
    s = session(max_bytes_per_s=100, burst_bytes=100, max_frame_bytes=100, max_message_bytes=100, max_msgs_per_s=1.0, burst=1)
    assert s.admit_frame(100, 0.0) is None
    assert take(s, 1, 0.0) is None  # messages still have their own token
    assert code(take(s, 2, 0.0)) is ErrorCode.RATE_LIMITED
    assert code(s.admit_frame(1, 0.0)) is ErrorCode.RATE_LIMITED


# --- error budget -------------------------------------------------------------------


def invalid(kind: ErrorCode = ErrorCode.MALFORMED) -> Invalid:
    return Invalid(1, kind, "why")


@pytest.mark.parametrize(
    "kind",
    [
        ErrorCode.MALFORMED,
        ErrorCode.BAD_SEQ,
        ErrorCode.TOO_LARGE,
        ErrorCode.BAD_TYPE,
        ErrorCode.NO_SUCH_ACTOR,
    ],
)
def test_too_many_errors_closes_with_1008(kind: ErrorCode) -> None:
    s = session(max_errors=3, errors_window_s=10.0)
    assert [s.rejected(invalid(kind), 1.0 + i) for i in range(3)] == [None, None, None]
    assert s.rejected(invalid(kind), 4.0) == CloseCode.TOO_MANY_ERRORS == 1008


def test_too_many_rate_limited_closes_with_4029() -> None:
    s = session(max_errors=3, max_rate_errors=5, errors_window_s=10.0)
    assert [s.rejected(invalid(ErrorCode.RATE_LIMITED), 1.0) for _ in range(5)] == [None] * 5
    assert s.rejected(invalid(ErrorCode.RATE_LIMITED), 1.0) == CloseCode.RATE_LIMITED == 4029


def test_rate_limited_answers_do_not_use_the_error_budget() -> None:
    s = session(max_errors=2, max_rate_errors=50, errors_window_s=10.0)
    for _ in range(20):
        assert s.rejected(invalid(ErrorCode.RATE_LIMITED), 1.0) is None
    assert s.rejected(invalid(), 1.0) is None
    assert s.rejected(invalid(), 1.0) is None
    assert s.rejected(invalid(), 1.0) == CloseCode.TOO_MANY_ERRORS


def test_other_errors_do_not_use_the_rate_budget() -> None:
    s = session(max_errors=100, max_rate_errors=2, errors_window_s=10.0)
    for _ in range(50):
        assert s.rejected(invalid(ErrorCode.BAD_SEQ), 1.0) is None
    assert s.rejected(invalid(ErrorCode.RATE_LIMITED), 1.0) is None
    assert s.rejected(invalid(ErrorCode.RATE_LIMITED), 1.0) is None
    assert s.rejected(invalid(ErrorCode.RATE_LIMITED), 1.0) == CloseCode.RATE_LIMITED


def test_error_counts_reset_after_the_window() -> None:
    s = session(now=100.0, max_errors=3, max_rate_errors=3, errors_window_s=10.0)
    for _ in range(3):
        assert s.rejected(invalid(), 100.0) is None
        assert s.rejected(invalid(ErrorCode.RATE_LIMITED), 100.0) is None
    # a new window: the same number again is tolerated
    for _ in range(3):
        assert s.rejected(invalid(), 110.5) is None
        assert s.rejected(invalid(ErrorCode.RATE_LIMITED), 110.5) is None
    assert s.rejected(invalid(), 111.0) == CloseCode.TOO_MANY_ERRORS
    assert s.rejected(invalid(ErrorCode.RATE_LIMITED), 111.0) == CloseCode.RATE_LIMITED


def test_errors_within_the_window_add_up() -> None:
    s = session(now=100.0, max_errors=3, errors_window_s=10.0)
    assert s.rejected(invalid(), 100.0) is None
    assert s.rejected(invalid(), 103.0) is None
    assert s.rejected(invalid(), 106.0) is None
    assert s.rejected(invalid(), 109.0) == CloseCode.TOO_MANY_ERRORS


def test_admit_and_rejected_together_end_a_flooding_client() -> None:
    s = session(max_msgs_per_s=10.0, burst=5, max_rate_errors=10, errors_window_s=10.0)
    closes = []
    for seq in range(1, 100):
        problem = take(s, seq, 0.0)
        if problem is not None:
            close = s.rejected(problem, 0.0)
            if close is not None:
                closes.append((seq, close))
                break
    assert closes == [(5 + 10 + 1, CloseCode.RATE_LIMITED)]
