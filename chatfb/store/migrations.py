"""Append-only, named schema migrations for the chatfb DuckDB store.

Each migration runs once, in order, inside one transaction, and is recorded in `_migrations`.
Never edit or reorder a released migration: add `m00N_...` at the end instead.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[str, list[str]]] = []


def migration(fn):
    MIGRATIONS.append((fn.__name__, fn()))
    return fn


@migration
def m001_initial():
    return [
        """CREATE TABLE conversations (
            id VARCHAR PRIMARY KEY,
            session_id VARCHAR NOT NULL,
            user_name VARCHAR,
            system_prompt VARCHAR NOT NULL DEFAULT '',
            source VARCHAR NOT NULL DEFAULT 'chat',   -- chat | import
            created_at TIMESTAMP NOT NULL
        )""",
        """CREATE TABLE messages (
            id VARCHAR PRIMARY KEY,
            conversation_id VARCHAR NOT NULL,
            seq INTEGER NOT NULL,
            role VARCHAR NOT NULL,                    -- user | assistant
            content VARCHAR NOT NULL,
            status VARCHAR NOT NULL DEFAULT 'ok',     -- ok | pending | failed | stopped
            error VARCHAR,
            model VARCHAR,
            adapter VARCHAR,
            replaces VARCHAR,                         -- assistant message this one regenerated
            replaced BOOLEAN NOT NULL DEFAULT FALSE,
            created_at TIMESTAMP NOT NULL,
            ttft_ms DOUBLE,
            latency_ms DOUBLE,
            prompt_tokens INTEGER,
            completion_tokens INTEGER
        )""",
        "CREATE INDEX messages_conversation ON messages(conversation_id)",
        """CREATE TABLE feedback (
            id VARCHAR PRIMARY KEY,
            message_id VARCHAR NOT NULL,
            kind VARCHAR NOT NULL,                    -- rating | critique | correction | implicit
            rating INTEGER,
            text VARCHAR,
            user_name VARCHAR,
            session_id VARCHAR,
            created_at TIMESTAMP NOT NULL,
            superseded_at TIMESTAMP                   -- set when the same author revises it
        )""",
        "CREATE INDEX feedback_message ON feedback(message_id)",
    ]


@migration
def m002_adapters():
    return [
        """CREATE TABLE adapters (
            name VARCHAR PRIMARY KEY,                 -- versioned, never reused: chatfb-v0001 ...
            parent VARCHAR,
            status VARCHAR NOT NULL,                  -- training | candidate | rejected | live | retired | failed
            path VARCHAR,                             -- relative to the data dir
            created_at TIMESTAMP NOT NULL,
            promoted_at TIMESTAMP,
            metrics JSON,
            data_counts JSON,
            timings JSON,
            recipe JSON,
            error VARCHAR
        )""",
    ]


@migration
def m003_inloop_feedback():
    """In-loop language feedback: candidate replies made from a critique (offered to the user, or
    selected by the nightly recipe, each with its score and verdict), provenance of corrections that
    came from an accepted revision, and standing preferences (guidelines)."""
    return [
        # the critique an accepted revision (stored as a correction) was made from
        "ALTER TABLE feedback ADD COLUMN derived_from VARCHAR",
        # ids of the guidelines a reply was generated under
        "ALTER TABLE messages ADD COLUMN guidelines JSON",
        """CREATE TABLE candidates (
            id VARCHAR PRIMARY KEY,
            feedback_id VARCHAR NOT NULL,             -- the critique (or guideline) it answers
            message_id VARCHAR,                       -- the critiqued reply
            origin VARCHAR NOT NULL,                  -- inloop | nightly
            text VARCHAR NOT NULL,
            score DOUBLE,                             -- the selection score (see chatfb.critique.candidates)
            verdict VARCHAR NOT NULL,                 -- 'ok' or why it was dropped
            status VARCHAR NOT NULL,                  -- offered | accepted | rejected | kept | dropped
            session_id VARCHAR,
            cycle VARCHAR,                            -- the adapter version a nightly selection was for
            details JSON,
            created_at TIMESTAMP NOT NULL
        )""",
        "CREATE INDEX candidates_feedback ON candidates(feedback_id)",
        """CREATE TABLE guidelines (
            id VARCHAR PRIMARY KEY,
            text VARCHAR NOT NULL,
            scope VARCHAR NOT NULL,                   -- user | global
            status VARCHAR NOT NULL,                  -- active | pending | retired (pending: global, awaiting an admin)
            session_id VARCHAR,                       -- owner (anonymous users)
            user_name VARCHAR,                        -- owner (logged-in users)
            source_feedback_id VARCHAR,               -- the critique it was kept from
            created_at TIMESTAMP NOT NULL,
            approved_at TIMESTAMP,
            retired_at TIMESTAMP
        )""",
    ]


@migration
def m006_conversation_titles():
    """A title the user gave a conversation (the chat's list of conversations shows it; without one,
    the conversation's first message)."""
    return ["ALTER TABLE conversations ADD COLUMN title VARCHAR"]
