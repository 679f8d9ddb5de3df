"""HTTP routers of the gateway (thin: parsing and response shapes only)."""
