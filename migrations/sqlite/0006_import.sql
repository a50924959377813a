-- `intake import`: how far the import of each mbox file got, so a second run (after an
-- interruption, or to pick up mail appended since) starts where the last one stopped.
-- Written after each batch commits; the ledger makes anything read twice a no-op.
CREATE TABLE import_progress (
    source TEXT PRIMARY KEY,            -- import:<canonical path>
    head_sha256 TEXT NOT NULL,          -- of the first min(64 KiB, byte_offset) bytes
    byte_offset BIGINT NOT NULL,        -- end of the last committed message
    tail_sha256 TEXT NOT NULL,          -- of the 4 KiB before byte_offset
    messages BIGINT NOT NULL,           -- messages before byte_offset
    file_size BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);

-- `intake simulate`: the facts each message was decided on (what the directory knew about
-- every address on it, its signals and thread), JSON, so a changed policy can be decided
-- again on the same facts. NULL for messages decided before this migration.
ALTER TABLE audit ADD COLUMN facts TEXT;
