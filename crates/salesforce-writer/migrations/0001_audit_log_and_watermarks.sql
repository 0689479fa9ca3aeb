-- Every change the writer made in Salesforce, with why and what asked for it.
CREATE TABLE audit_log (
    id          BIGSERIAL PRIMARY KEY,
    email       TEXT        NOT NULL,
    object      TEXT        NOT NULL,
    record_id   TEXT        NOT NULL,
    old_value   BOOLEAN     NOT NULL,
    new_value   BOOLEAN     NOT NULL,
    reason      TEXT        NOT NULL,
    "trigger"   TEXT        NOT NULL,
    trace_id    TEXT,
    written_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

CREATE INDEX audit_log_email_written_at ON audit_log (email, written_at);
CREATE INDEX audit_log_record_id ON audit_log (record_id);

-- How far the Salesforce poll has read, per object (max SystemModstamp seen).
CREATE TABLE sf_watermarks (
    object     TEXT PRIMARY KEY,
    watermark  TIMESTAMPTZ NOT NULL
);
