-- intake schema, SQLite flavour. Keep in step with migrations/postgres: same tables,
-- same columns, same meaning. Times are unix seconds (BIGINT) on both backends.

CREATE TABLE accounts (
    id INTEGER PRIMARY KEY,
    address TEXT NOT NULL UNIQUE,
    display_name TEXT,
    kind TEXT NOT NULL CHECK (kind IN ('internal', 'portal_only')),
    status TEXT NOT NULL CHECK (status IN ('pending', 'active', 'deactivated')),
    origin TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    verified_at BIGINT,
    last_verification_sent_at BIGINT,
    undeliverable_at BIGINT,
    soft_bounces BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE organizations (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    origin TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

CREATE TABLE organization_domains (
    organization_id BIGINT NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    pattern TEXT NOT NULL,
    PRIMARY KEY (organization_id, pattern)
);

CREATE TABLE organization_members (
    organization_id BIGINT NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    account_id BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    origin TEXT NOT NULL,
    PRIMARY KEY (organization_id, account_id)
);
CREATE INDEX organization_members_account ON organization_members (account_id);

CREATE TABLE organization_desks (
    organization_id BIGINT NOT NULL REFERENCES organizations (id) ON DELETE CASCADE,
    desk TEXT NOT NULL,
    PRIMARY KEY (organization_id, desk)
);

CREATE TABLE customer_groups (
    id INTEGER PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    origin TEXT NOT NULL
);

CREATE TABLE group_members (
    group_id BIGINT NOT NULL REFERENCES customer_groups (id) ON DELETE CASCADE,
    account_id BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    PRIMARY KEY (group_id, account_id)
);
CREATE INDEX group_members_account ON group_members (account_id);

CREATE TABLE group_desks (
    group_id BIGINT NOT NULL REFERENCES customer_groups (id) ON DELETE CASCADE,
    desk TEXT NOT NULL,
    PRIMARY KEY (group_id, desk)
);

CREATE TABLE desk_customers (
    desk TEXT NOT NULL,
    account_id BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    origin TEXT NOT NULL,
    PRIMARY KEY (desk, account_id)
);
CREATE INDEX desk_customers_account ON desk_customers (account_id);

CREATE TABLE agents (
    id INTEGER PRIMARY KEY,
    address TEXT NOT NULL UNIQUE,
    display_name TEXT,
    origin TEXT NOT NULL
);

CREATE TABLE agent_desks (
    agent_id BIGINT NOT NULL REFERENCES agents (id) ON DELETE CASCADE,
    desk TEXT NOT NULL,
    PRIMARY KEY (agent_id, desk)
);

CREATE TABLE desk_counters (
    desk TEXT PRIMARY KEY,
    last_number BIGINT NOT NULL
);

CREATE TABLE requests (
    id INTEGER PRIMARY KEY,
    request_key TEXT NOT NULL UNIQUE,
    desk TEXT NOT NULL,
    number BIGINT NOT NULL,
    reporter_address TEXT NOT NULL,
    reporter_account_id BIGINT REFERENCES accounts (id),
    subject TEXT NOT NULL,
    description TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('open', 'held', 'expired')),
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL,
    held_until BIGINT,
    UNIQUE (desk, number)
);
CREATE INDEX requests_reporter ON requests (desk, reporter_address, created_at);
CREATE INDEX requests_status ON requests (status, held_until);

CREATE TABLE participants (
    request_id BIGINT NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    account_id BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    added_at BIGINT NOT NULL,
    PRIMARY KEY (request_id, account_id)
);
CREATE INDEX participants_account ON participants (account_id);

CREATE TABLE comments (
    id INTEGER PRIMARY KEY,
    request_id BIGINT NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    author_address TEXT NOT NULL,
    body TEXT NOT NULL,
    message_id TEXT,
    created_at BIGINT NOT NULL
);
CREATE INDEX comments_request ON comments (request_id);

CREATE TABLE attachment_blobs (
    sha256 TEXT PRIMARY KEY,
    size BIGINT NOT NULL,
    content BLOB NOT NULL
);

CREATE TABLE attachments (
    id INTEGER PRIMARY KEY,
    request_id BIGINT NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    comment_id BIGINT REFERENCES comments (id) ON DELETE CASCADE,
    filename TEXT NOT NULL,
    content_type TEXT NOT NULL,
    size BIGINT NOT NULL,
    sha256 TEXT NOT NULL REFERENCES attachment_blobs (sha256),
    created_at BIGINT NOT NULL
);
CREATE INDEX attachments_request ON attachments (request_id);

-- Message-IDs known for a request (inbound and outbound), for threading replies.
CREATE TABLE thread_refs (
    desk TEXT NOT NULL,
    message_id TEXT NOT NULL,
    request_id BIGINT NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    direction TEXT NOT NULL CHECK (direction IN ('inbound', 'outbound')),
    PRIMARY KEY (desk, message_id)
);

-- One row per message seen: the exactly-once ledger. dedupe_key is unique; a message
-- delivered again finds its row and becomes a no-op.
CREATE TABLE ledger (
    id INTEGER PRIMARY KEY,
    source TEXT NOT NULL,
    source_ref TEXT NOT NULL,
    desk TEXT,
    message_id TEXT,
    content_hash TEXT NOT NULL,
    dedupe_key TEXT UNIQUE,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    detail TEXT,
    request_key TEXT,
    sender TEXT,
    subject TEXT,
    size BIGINT NOT NULL,
    processed_at BIGINT NOT NULL,
    quarantine_ref TEXT,
    released_at BIGINT
);
CREATE INDEX ledger_hash ON ledger (content_hash);
CREATE INDEX ledger_action ON ledger (action, processed_at);

CREATE TABLE audit (
    id INTEGER PRIMARY KEY,
    ledger_id BIGINT REFERENCES ledger (id),
    created_at BIGINT NOT NULL,
    desk TEXT,
    action TEXT NOT NULL,
    reason TEXT NOT NULL,
    request_key TEXT,
    decision TEXT NOT NULL
);
CREATE INDEX audit_created ON audit (created_at);

CREATE TABLE audit_addresses (
    audit_id BIGINT NOT NULL REFERENCES audit (id) ON DELETE CASCADE,
    address TEXT NOT NULL,
    role TEXT NOT NULL,
    outcome TEXT NOT NULL,
    reason TEXT NOT NULL,
    PRIMARY KEY (audit_id, address, role)
);
CREATE INDEX audit_addresses_address ON audit_addresses (address);

CREATE TABLE outbox (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    desk TEXT,
    to_address TEXT NOT NULL,
    from_address TEXT NOT NULL,
    subject TEXT NOT NULL,
    body_text TEXT NOT NULL,
    message_id TEXT NOT NULL UNIQUE,
    in_reply_to TEXT,
    request_key TEXT,
    status TEXT NOT NULL CHECK (status IN ('pending', 'sending', 'sent', 'dead')),
    attempts BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,
    last_error TEXT,
    created_at BIGINT NOT NULL,
    sent_at BIGINT,
    ledger_id BIGINT REFERENCES ledger (id)
);
CREATE INDEX outbox_due ON outbox (status, next_attempt_at);
CREATE INDEX outbox_to ON outbox (to_address, kind, created_at);

CREATE TABLE verification_tokens (
    token_hash TEXT PRIMARY KEY,
    account_id BIGINT NOT NULL REFERENCES accounts (id) ON DELETE CASCADE,
    purpose TEXT NOT NULL CHECK (purpose IN ('verification', 'invitation')),
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT
);
CREATE INDEX verification_tokens_account ON verification_tokens (account_id);

CREATE TABLE mailbox_state (
    mailbox TEXT PRIMARY KEY,
    uidvalidity BIGINT,
    last_uid BIGINT,
    updated_at BIGINT NOT NULL,
    lease_owner TEXT,
    lease_expires_at BIGINT
);

-- Small facts about the database itself (e.g. the hash of the last synced directory).
CREATE TABLE meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
