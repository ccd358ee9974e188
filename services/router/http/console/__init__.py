"""The operator console under /console/: server-rendered pages over the router's admin operations
(`services/router/admin.py`, the ones AdminService runs) and billing's operator RPCs."""
