-- The mailboxes each instance is configured to work, separated by spaces (a mailbox name
-- holds none), so an instance counts toward the fair share only of the mailboxes it can
-- take: an instance with none (HTTP only) or with an older list during a rolling
-- restart no longer lowers everyone's share. NULL: an instance of a version before this
-- column, which counts itself for every mailbox.
ALTER TABLE instances ADD COLUMN mailboxes TEXT;
