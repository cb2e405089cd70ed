"""Dynamic batching: a pure policy (``policy``) and the asyncio shell that drives it (``batcher``)."""
