-- Opt-outs decided from an audience's first sync wait here until the first sync has gone quiet: until
-- then the evaluator may have seen a person's unsubscribed member in one audience but not yet their
-- subscribed member in another (see evaluate.rs, `Evaluator::release_held`).
CREATE TABLE held_opt_outs (
    email   text        PRIMARY KEY,
    held_at timestamptz NOT NULL DEFAULT now()
);

-- When a first-sync page was last applied: one row, shared by every evaluator replica.
CREATE TABLE first_sync_activity (
    id        smallint    PRIMARY KEY DEFAULT 1 CHECK (id = 1),
    last_seen timestamptz NOT NULL
);
