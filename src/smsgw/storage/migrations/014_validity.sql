-- A message's validity (issue 24): seconds from its accept it may wait to be sent, the
-- customer's own (60 s to 72 h); NULL: the node's default (24 h, RetryPolicy.validity_s).
-- A message not sent within it ends `expired`, as one cancelled while queued ends `cancelled`;
-- both release the hold as `failed` does (storage/ledger.py counts them with it). A nullable
-- column without a default is a catalog change only: no rewrite of `messages`.
ALTER TABLE messages ADD COLUMN validity_s int;
