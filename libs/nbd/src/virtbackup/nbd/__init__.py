"""Asyncio NBD client."""
