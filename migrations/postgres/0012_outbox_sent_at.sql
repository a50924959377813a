-- Sent mail older than `outbox.keep_sent` is deleted (the daemon's hourly pass, `intake
-- expire`): this index finds it without reading the whole outbox.
CREATE INDEX outbox_sent_at ON outbox (sent_at) WHERE status = 'sent';
