"""Connectors to the outside world the engine talks to: operators (operators/: the HTTP batch
protocol and SMPP 3.4, each a `Provider`) and customers' status callback URLs (webhooks: the
callbacks' HTTP poster behind the SSRF guard)."""
