"""The gateway service: the HTTP, SSE and WebSocket surfaces of VirtBackup.

It owns authentication, TLS and the API documents' shapes; every read or change of
state goes over the bus to the service that owns it (the agent configuration, a shared
document, is kept by the gateway in the ``VB_CONFIG`` bucket).
"""
