"""Fakes of the outside world: simulated operators (in-process and as an HTTP server), a
simulated SMSC, delayed delivery reports, the load generator, and MemStore (the message store
in memory). The composition roots build nodes with them; the harness (smsgw.simulate) drives
them."""
