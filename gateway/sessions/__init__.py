"""Server-side sessions: sealed records in Redis or memory, keyed by an opaque cookie."""
