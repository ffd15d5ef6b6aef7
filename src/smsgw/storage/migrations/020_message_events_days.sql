-- A message's history (017) in day partitions, as `messages` (019): its message_id is a
-- message's UUIDv7 id, so a history row lives in the partition of its message's day, and a
-- read of one message's events prunes to one partition. A day of events is dropped once its
-- messages' day is gone (`pending`: the messages partition of the same day still exists; the
-- upkeep drops `messages` first, storage/partitions.py), never before: a message kept past
-- the retention (it was still pending) keeps its history.
ALTER TABLE message_events RENAME TO message_events_unpartitioned;
ALTER INDEX message_events_pkey RENAME TO message_events_unpartitioned_pkey;
CREATE TABLE message_events (
    LIKE message_events_unpartitioned
    INCLUDING DEFAULTS INCLUDING CONSTRAINTS INCLUDING STORAGE INCLUDING COMPRESSION
) PARTITION BY RANGE (message_id);
ALTER TABLE message_events ADD PRIMARY KEY (message_id, at, seq);

INSERT INTO day_partitioned (parent, pending) VALUES (
    'message_events',
    $$SELECT to_regclass(quote_ident('messages_' || substr(%1$L, length('message_events_') + 1)))
             IS NOT NULL$$
);

-- A partition for every day `messages` has one (every event's message is in one of them),
-- the day read from the name's YYYYMMDD, whose year may have five digits: an id that is not a
-- UUIDv7 names whatever day its first 48 bits say, up to the year 10889 (migration 019).
SELECT smsgw_add_day_partition(
    'message_events',
    make_date(left(d, length(d) - 4)::int, substr(d, length(d) - 3, 2)::int, right(d, 2)::int))
FROM (SELECT substr(c.relname, length('messages_') + 1) AS d
      FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
      WHERE i.inhparent = 'messages'::regclass) AS p
ORDER BY 1;

INSERT INTO message_events SELECT * FROM message_events_unpartitioned;
DROP TABLE message_events_unpartitioned;
