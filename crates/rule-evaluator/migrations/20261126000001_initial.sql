-- Member state per (email, audience), as last reported by Mailchimp. Deleted members stay, with status
-- 'deleted', so that a stale snapshot cannot bring them back.
CREATE TABLE members (
    email        text        NOT NULL,
    audience_id  text        NOT NULL,
    status       text        NOT NULL,
    last_changed timestamptz NOT NULL,
    learned_from text        NOT NULL,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (email, audience_id)
);

-- Every status change the evaluator saw, for Explain. from_status is NULL for a member first seen.
CREATE TABLE transitions (
    id           bigserial   PRIMARY KEY,
    email        text        NOT NULL,
    audience_id  text        NOT NULL,
    from_status  text,
    to_status    text        NOT NULL,
    last_changed timestamptz NOT NULL,
    learned_from text        NOT NULL,
    seen_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX transitions_by_email ON transitions (email, id);

-- The current decision per email. version moves on every change of decision or opt-in evidence, so a writer
-- can tell whether what it wrote is still current.
CREATE TABLE persons (
    email              text        PRIMARY KEY,
    decision           text        NOT NULL,
    rule               text        NOT NULL,
    version            bigint      NOT NULL DEFAULT 0,
    opt_in_evidence_id bigint,
    updated_at         timestamptz NOT NULL DEFAULT now()
);
-- The writer's drift checks look for pending work.
CREATE INDEX persons_with_evidence ON persons (email) WHERE opt_in_evidence_id IS NOT NULL;

CREATE SEQUENCE opt_in_evidence_ids;
