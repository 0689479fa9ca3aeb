-- Per-audience progress of the primary sync. `watermark` is the start of the last run that
-- published every page of the audience; NULL until the first sync completes.
CREATE TABLE audience_watermarks (
    audience_id             TEXT PRIMARY KEY,
    watermark               TIMESTAMPTZ NULL,
    first_sync_completed_at TIMESTAMPTZ NULL,
    last_sync_started_at    TIMESTAMPTZ NULL,
    last_sync_finished_at   TIMESTAMPTZ NULL
);

-- One row per sync run, scheduled or triggered.
CREATE TABLE sync_runs (
    run_id          TEXT PRIMARY KEY,
    started_at      TIMESTAMPTZ NOT NULL,
    finished_at     TIMESTAMPTZ NULL,
    -- running, succeeded, failed, stopped
    status          TEXT NOT NULL,
    members_read    BIGINT NOT NULL DEFAULT 0,
    pages_published BIGINT NOT NULL DEFAULT 0,
    error           TEXT NULL
);

CREATE INDEX sync_runs_started_at ON sync_runs (started_at DESC);
