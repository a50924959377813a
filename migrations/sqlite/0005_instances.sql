-- Running instances (several `intake run` on one database), for sharing mailboxes
-- fairly: each renews its row; rows past expires_at are instances that died or left.
CREATE TABLE instances (
    holder TEXT PRIMARY KEY,
    started_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
