"""Workflow progress events: one vocabulary, a bus (Redis Streams or in-process) and the
websocket/SSE transports that deliver it (issue 5)."""
