"""A small Python client for the router: `GLMClient(api_key).generate(prompt)`."""

from services.client.glm_client import Completion, Delta, GLMClient

__all__ = ["Completion", "Delta", "GLMClient"]
