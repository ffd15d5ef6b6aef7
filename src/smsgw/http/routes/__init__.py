"""Route modules, one per area of the API; each declares its routes on an `Api` named `api`
(http/api.py)."""
