-- The W3C traceparent of the batch that held each opt-out, so its release continues that trace
-- (the sync run that read the member) instead of starting one of its own.
ALTER TABLE held_opt_outs ADD COLUMN traceparent text NULL;
