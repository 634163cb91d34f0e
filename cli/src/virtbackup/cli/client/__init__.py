"""The operator's command line (``virtbackup login``, ``backup``, ``points`` ...): a client
of the public HTTP APIs only (the agent and native API on the HTTPS listener, the identity
API's login), with named contexts like kubectl's (``contexts``), rich tables and progress
bars fed by the gateway's SSE stream (``progress``)."""
