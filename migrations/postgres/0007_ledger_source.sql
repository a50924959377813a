-- The ledger by where a message came from: which UIDs (IMAP) or files (Maildir import)
-- of a source were already recorded, asked after every reconnect and import batch.
CREATE INDEX ledger_source ON ledger (source, source_ref);
