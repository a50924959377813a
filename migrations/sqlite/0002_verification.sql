-- Verification and invitation mail: HTML bodies, and the To/Cc of held requests (their
-- participants are decided when the request is released, under the policy then in force).

ALTER TABLE outbox ADD COLUMN body_html TEXT;

CREATE TABLE held_recipients (
    request_id BIGINT NOT NULL REFERENCES requests (id) ON DELETE CASCADE,
    position BIGINT NOT NULL,
    address TEXT NOT NULL,
    display_name TEXT,
    PRIMARY KEY (request_id, position)
);
