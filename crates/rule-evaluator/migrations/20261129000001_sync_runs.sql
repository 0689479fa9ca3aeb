-- The end of each sync run (`SyncRunDone` in messages.proto): once every page the run counted has
-- been applied and its persons.dirty published, the evaluator sends every persons.dirty partition a
-- flush, so the writer writes the run's changes at once (see evaluate.rs, `Evaluator::flush_runs`).
CREATE TABLE sync_runs (
    run_id   text        PRIMARY KEY,
    pages    integer     NOT NULL,
    -- Set in the transaction that published the flush, so a run is flushed once.
    flushed  boolean     NOT NULL DEFAULT false,
    ended_at timestamptz NOT NULL DEFAULT now()
);

-- The pages applied whose persons.dirty are published, by run (pages are numbered per audience).
-- Deleted with the run's flush; those of a run whose end never came are forgotten after a day.
CREATE TABLE sync_run_pages (
    run_id      text        NOT NULL,
    audience_id text        NOT NULL,
    page        integer     NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, audience_id, page)
);
