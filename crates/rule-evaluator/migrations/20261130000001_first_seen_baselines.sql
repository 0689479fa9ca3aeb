-- A member first seen is not logged in transitions at once. Until its row first changes, the row
-- is that transition: NULL -> status, at last_changed, learned_from, seen at first_seen_at. The
-- first change of the row writes it to transitions, ahead of the change's own transition, and
-- clears first_seen_at; Explain shows the history the same either way. A first sync of a million
-- members so skips a million inserts into transitions and its email index, most of whose rows
-- would never be read.
-- NULL: the member's first-seen transition is in transitions (every row written before this).
ALTER TABLE members ADD COLUMN first_seen_at timestamptz;
