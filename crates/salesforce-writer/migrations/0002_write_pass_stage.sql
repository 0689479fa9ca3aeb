-- The working set of a write pass: the emails it was handed and the records it must change, with
-- how each write ended. Kept here rather than in the writer's memory, so the memory of a pass does
-- not grow with the burst it writes (a first sync of a large org hands in tens of thousands of
-- emails at once). UNLOGGED: nothing here outlives its pass, whose messages are only acknowledged
-- once it has ended (a crash redelivers them), so the rows need no write-ahead log.
CREATE SEQUENCE write_pass_ids;

CREATE UNLOGGED TABLE pass_emails (
    pass        BIGINT      NOT NULL,
    -- "C": the byte order of Rust strings, which pages are read and searched in.
    email       TEXT COLLATE "C" NOT NULL,
    -- The trace id of the message that carried the email (the audit row's fallback trace).
    trace_id    TEXT,
    staged_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (pass, email)
);

CREATE UNLOGGED TABLE pass_changes (
    pass          BIGINT      NOT NULL,
    object        TEXT COLLATE "C" NOT NULL,
    record_id     TEXT COLLATE "C" NOT NULL,
    email         TEXT COLLATE "C" NOT NULL,
    old_value     BOOLEAN     NOT NULL,
    new_value     BOOLEAN     NOT NULL,
    reason        TEXT        NOT NULL,
    version       BIGINT      NOT NULL,
    opted_out_at  TIMESTAMPTZ,
    trace_id      TEXT,
    -- NULL until the write settles it: 'written', 'converted' (a converted Lead, skipped),
    -- 'retry' (still failing transiently, with its message) or 'failed' (rejected for good,
    -- with Salesforce's status code and message).
    outcome       TEXT,
    status_code   TEXT,
    message       TEXT,
    staged_at     TIMESTAMPTZ NOT NULL DEFAULT now(),
    PRIMARY KEY (pass, object, record_id)
);

-- The recheck reads a pass's written emails in order.
CREATE INDEX pass_changes_email ON pass_changes (pass, email);
