-- The shard whose lease dispatches a message, when it is not its account's (NULL: it is).
-- A node among several dispatches the express messages it accepts under a shard it leases
-- itself (engine/shards.py, `ShardLeases.express_shard`), so an express message waits for no
-- other node; a takeover of that shard recovers it like any of the shard's messages.
ALTER TABLE messages ADD COLUMN dispatch_shard smallint;
