-- The first-sync hold now ends on the fetcher's markers instead of a quiet timer (see evaluate.rs,
-- `Evaluator::release_held`): held opt-outs go once no audience below is pending.
DROP TABLE first_sync_activity;

-- One row per audience whose first sync the fetcher announced or started. Pending until the run in
-- `run_id` has said how many pages it published (`expected_pages`) and that many distinct pages of
-- that run are counted in `first_sync_pages`.
CREATE TABLE first_sync_audiences (
    audience_id    text        PRIMARY KEY,
    -- The run paging the audience; NULL while only announced.
    run_id         text        NULL,
    -- When that run started: markers of older runs are ignored.
    run_started_at timestamptz NULL,
    expected_pages integer     NULL,
    completed      boolean     NOT NULL DEFAULT false,
    -- Last marker or page: a pending audience untouched for the max hold no longer holds anything
    -- (removed from scope mid-first-sync, or its fetcher gone).
    touched_at     timestamptz NOT NULL DEFAULT now()
);

-- The first-sync pages applied, by run. Written in the transaction that holds the page's opt-outs,
-- so a counted page's opt-outs are always already in held_opt_outs.
CREATE TABLE first_sync_pages (
    audience_id text        NOT NULL,
    run_id      text        NOT NULL,
    page        integer     NOT NULL,
    seen_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (audience_id, run_id, page)
);

-- The release check runs after every first-sync batch: while an audience is pending it looks only
-- for opt-outs held past the max hold, which this index finds without reading the others.
CREATE INDEX held_opt_outs_held_at ON held_opt_outs (held_at);
