"""gateway: an identity-aware reverse proxy with an OpenID Connect login for apps that have none."""

__version__ = "0.1.0"
