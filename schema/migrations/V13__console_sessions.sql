-- Finance console sign-ins (contract, "Spend reports and the finance
-- console"): a session is tied to the token pasted at sign-in and ends when
-- the user signs out, when that token is revoked (every lookup joins the
-- live token), or after 12 hours without a request. Only the SHA-256 of
-- the cookie is stored.
CREATE TABLE console_sessions (
    session_hash  bytea       PRIMARY KEY,
    token_id      text        NOT NULL REFERENCES access_tokens (token_id),
    csrf          text        NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_seen_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX console_sessions_idle ON console_sessions (last_seen_at);
