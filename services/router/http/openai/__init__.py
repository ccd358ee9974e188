"""OpenAI's wire format: pydantic models, conversions to and from the gateway's types, one router per API."""
