"""The gateway: the one API a shop calls. Scenarios from config, real-time events, fallbacks."""
