"""The docs say what the code does."""

from __future__ import annotations

from pathlib import Path

from relay import config

ROOT = Path(__file__).resolve().parent.parent


def test_readme_settings_table_is_the_generated_one():
    readme = (ROOT / "README.md").read_text()
    assert config.table_markdown() in readme, "run scripts/sync-readme"


def test_every_close_code_is_documented():
    from relay.protocol import CloseCode

    for doc in ("README.md", "docs/protocol.md"):
        text = (ROOT / doc).read_text()
        for code in CloseCode:
            assert f"| {code.value} |" in text, (doc, code)


def test_every_error_code_is_documented():
    from relay.protocol import ErrorCode

    text = (ROOT / "docs/protocol.md").read_text()
    for code in ErrorCode:
        assert f"`{code.value}`" in text, code
