"""Route modules, one per area of the API; each exports a quart Blueprint named `bp`."""
