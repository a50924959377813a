-- The UID a mailbox's progress started from (first contact or a UIDVALIDITY change):
-- every message above it and at or below last_uid was committed by intake, so one still
-- unacknowledged after a reconnect is a leftover to acknowledge, whether or not it has a
-- ledger row of its own (a duplicate has none). NULL for progress recorded before this
-- column existed: then only UIDs with a ledger row count.
ALTER TABLE mailbox_state ADD COLUMN first_uid INTEGER;
