"""The HTTP and WebSocket front end (Klein and Autobahn)."""
