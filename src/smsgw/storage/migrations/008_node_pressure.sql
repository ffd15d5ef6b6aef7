-- What a node's admission refuses, published with its heartbeat (engine/admission.py,
-- `Pressure` as JSON; NULL: it admits everything), so a node accepting for an account another
-- node dispatches refuses what that node would. Written in the heartbeat's own row update.
ALTER TABLE nodes ADD COLUMN pressure text;
