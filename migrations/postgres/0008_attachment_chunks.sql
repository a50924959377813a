-- Attachment content in pieces of at most 1 MiB, in order (seq from 0): a large file
-- goes into the database a piece at a time instead of being copied whole into each
-- layer on its way there. For blobs stored since this migration, attachment_blobs.content
-- is empty and the file is the concatenation of its chunks; older blobs keep their
-- content there and have no chunks.
CREATE TABLE attachment_chunks (
    sha256 TEXT NOT NULL REFERENCES attachment_blobs (sha256) ON DELETE CASCADE,
    seq INTEGER NOT NULL,
    content BYTEA NOT NULL,
    PRIMARY KEY (sha256, seq)
);
