-- With `start = "new"`: the newest INTERNALDATE (Unix seconds, the server's clock) in the
-- folder at first contact. After a UIDVALIDITY change the rescan starts at the first
-- message newer than this, so mail that was there before intake first started is not
-- turned into requests then. NULL: the folder was empty, `start = "all"`, or the
-- progress was started before this column existed (then the rescan starts at UID 1).
ALTER TABLE mailbox_state ADD COLUMN new_after INTEGER;
