-- The highest UID up to which every message was acknowledged (flagged, moved or
-- deleted), recorded with the next batch's commit. With after = "seen" the leftover
-- search after a reconnect starts above it, so a message staff marked unread again is not
-- downloaded, skipped as processed and flagged read behind their back.
ALTER TABLE mailbox_state ADD COLUMN acked_uid BIGINT;
