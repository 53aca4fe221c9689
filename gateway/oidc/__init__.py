"""OpenID Connect relying party: provider metadata and keys, the code flow, token validation."""
