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
def m004_provenance_and_review():
    """Who taught what, and whether it may teach everyone (chatfb.learning.trust): the kind of each
    feedback row, the CLI import's `--trusted` mark, a hash of the client's address per conversation,
    the admin's review decisions and flagged users, and which adapters still carry a deleted user's rows."""
    # New columns are nullable with a default: DuckDB cannot add a NOT NULL column to a table with an index.
    return [
        # written_correction | accepted_revision | edited_revision | critique | rating | implicit
        "ALTER TABLE feedback ADD COLUMN origin VARCHAR",
        # imported with `import-feedback --trusted`: the operator vouches for the file
        "ALTER TABLE feedback ADD COLUMN trusted BOOLEAN DEFAULT FALSE",
        # a salted hash of the client's address (sessions from one address count once); NULL = not known
        "ALTER TABLE conversations ADD COLUMN client VARCHAR",
        """CREATE TABLE reviews (
            feedback_id VARCHAR PRIMARY KEY,
            decision VARCHAR NOT NULL,                -- approved | rejected
            decided_at TIMESTAMP NOT NULL
        )""",
        """CREATE TABLE flagged_authors (
            author VARCHAR PRIMARY KEY,               -- a user name, or an anonymous session id
            reason VARCHAR,
            flagged_at TIMESTAMP NOT NULL
        )""",
        # how many deleted users' rows an adapter was trained on (it keeps them until a cycle retrains without)
        "ALTER TABLE adapters ADD COLUMN deleted_users INTEGER DEFAULT 0",
        # old rows' origin (after every ALTER: DuckDB refuses to alter a table a pending UPDATE touched)
        """UPDATE feedback SET origin = CASE
            WHEN kind = 'correction' AND derived_from IS NULL THEN 'written_correction'
            WHEN kind = 'correction' AND EXISTS (SELECT 1 FROM candidates c WHERE c.feedback_id = feedback.derived_from
                 AND c.message_id = feedback.message_id AND c.text = feedback.text) THEN 'accepted_revision'
            WHEN kind = 'correction' THEN 'edited_revision'
            ELSE kind END""",
    ]


@migration
def m005_api_keys():
    """API keys an admin issues per user (python -m chatfb api-key): only a hash of each key is kept."""
    return [
        """CREATE TABLE api_keys (
            id VARCHAR PRIMARY KEY,
            user_name VARCHAR NOT NULL,               -- whose chats the key sends (their guidelines apply)
            key_hash VARCHAR NOT NULL UNIQUE,         -- SHA-256 of the key, hex (keys are random: no salt needed)
            prefix VARCHAR NOT NULL,                  -- the key's first characters, to tell keys apart in a list
            created_at TIMESTAMP NOT NULL,
            revoked_at TIMESTAMP
        )""",
    ]


@migration
def m006_personal_adapters():
    """Personal adapters (chatfb.learning.cycle): whose adapter a row is. NULL = the shared adapter everyone
    is served; else the user's name or anonymous author id (chatfb.learning.trust.who), served only to them.
    Each owner has at most one live adapter of their own beside the shared live one."""
    return ["ALTER TABLE adapters ADD COLUMN owner VARCHAR"]


@migration
def m007_conversation_titles():
    """A title the user gave a conversation (the chat's list of conversations shows it; without one,
    the conversation's first message)."""
    return ["ALTER TABLE conversations ADD COLUMN title VARCHAR"]


@migration
def m008_review_content():
    """What an admin rejected, kept with the decision: the question the row answered and the text it taught. A
    rejection is the admin's record, not the user's row: it outlives the row's conversation (deleted by its user,
    by retention or with its user) and keeps closing its question and refusing the same text sent again."""
    return ["ALTER TABLE reviews ADD COLUMN question VARCHAR", "ALTER TABLE reviews ADD COLUMN taught VARCHAR"]


@migration
def m009_uptake():
    """Uptake (chatfb.learning.uptake): after a cycle promotes an adapter, each trained feedback item's prompt
    asked again of it, and whether the answer shows the item was learned."""
    return [
        """CREATE TABLE uptake (
            feedback_id VARCHAR NOT NULL,             -- the correction or critique that trained
            adapter VARCHAR NOT NULL,                 -- the promoted adapter that was asked
            learned BOOLEAN NOT NULL,
            measure VARCHAR NOT NULL,                 -- rougeL (a correction) | critique_pass (a critique)
            score DOUBLE,                             -- ROUGE-L to the correction, or the critique selection's score
            answer VARCHAR NOT NULL,                  -- what the adapter answered
            checked_at TIMESTAMP NOT NULL,
            PRIMARY KEY (feedback_id, adapter)
        )""",
    ]


@migration
def m010_finish_reason():
    """Why a reply ended, as the model server said ("stop", or "length" where the token limit cut it off): a
    cut-off reply is framed only up to its last whole sentence when a critique's phrase is added to it (in the
    chat and in the nightly), never with a closing phrase after half a word. NULL for replies from before it."""
    return ["ALTER TABLE messages ADD COLUMN finish_reason VARCHAR"]
