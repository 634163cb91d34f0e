"""One controller per resource: HTTP in, a command on the bus, HTTP out."""
